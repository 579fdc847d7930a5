"""Pieces shared by the execution paths: sparse address decoding, the varlen split, the empty state."""

from __future__ import annotations

import torch

from ..address import beam_topk, cape_shift
from ..pdma import proxy_decay
from .spec import RAMSpec
from .state import RAMState


def decode_tokens(q: torch.Tensor, k: torch.Tensor, spec: RAMSpec, positions: torch.Tensor, use_triton: bool = False):
    """Write/read slots and weights of every token, CAPE applied, plus the write decay.

    Returns ``write_idx, write_w, decay, read_idx, read_w``, each ``[B, T, H, K]``; with
    ``use_triton`` the fused Triton decoder computes the addresses (weights in fp32).
    """
    # Keys and queries decoded in one batch: half the (many, small) kernel launches.
    x = torch.stack([k, q])
    if use_triton:
        from ..address.triton import triton_beam_topk  # imports triton

        shift = (positions[:, :, None] * spec.cape.to(positions.dtype)).expand(2, *x.shape[1:4])
        index, weight = triton_beam_topk(x.reshape(-1, x.shape[-1]), spec.num_partitions, spec.topk, spec.tau,
                                         shift=shift.reshape(-1))
        index, weight = index.view(*x.shape[:4], -1), weight.view(*x.shape[:4], -1)
    else:
        index, weight = beam_topk(x, spec.num_partitions, spec.topk, spec.tau)
        index = cape_shift(index.flatten(0, 1), positions.repeat(2, 1), spec.cape, spec.memory_slots).view(index.shape)
    (write_idx, read_idx), (write_w, read_w) = index.unbind(0), weight.unbind(0)
    decay = proxy_decay(write_w, spec.gamma[:, None].to(write_w.dtype), spec.proxy_eps)
    return write_idx, write_w, decay, read_idx, read_w


def run_per_sequence(core, tokens, state, cu_seqlens: torch.Tensor | None):
    """Run ``core(*tokens, state) -> (o, final)`` on each packed sequence of ``cu_seqlens`` in turn,
    each from its own entry of ``state`` (the stepping paths handle varlen input this way).

    ``tokens``: tensors ``[B, T, ...]`` (B = 1 when packed), cut along T for each sequence.
    ``state``: a tensor or a NamedTuple of tensors (``RAMState``) with one entry per sequence along
    dim 0. The outputs are concatenated along T, the final states along dim 0 (into state's type).
    ``core`` also gets the empty sequences of ``cu_seqlens``. Without ``cu_seqlens``, one call.
    """
    if cu_seqlens is None:
        return core(*tokens, state)
    bounds = cu_seqlens.tolist()
    outputs, finals = [], []
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        o, final = core(*(x[:, start:end] for x in tokens), _entry(state, n))
        outputs.append(o)
        finals.append(final)
    return torch.cat(outputs, dim=1), _concat(finals)


def _entry(state, n: int):
    """Sequence ``n`` of ``state`` (a tensor or a NamedTuple of tensors), keeping its dim 0."""
    if isinstance(state, torch.Tensor):
        return state[n : n + 1]
    return type(state)(*(_entry(part, n) for part in state))


def _concat(states: list):
    """``states`` (tensors, or NamedTuples of tensors) concatenated along dim 0."""
    if isinstance(states[0], torch.Tensor):
        return torch.cat(states)
    return type(states[0])(*(_concat(list(parts)) for parts in zip(*states)))


def num_sequences(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    return q.shape[0] if cu_seqlens is None else len(cu_seqlens) - 1


def empty_state(q: torch.Tensor, v: torch.Tensor, spec: RAMSpec, cu_seqlens) -> RAMState:
    return RAMState.empty(
        num_sequences(q, cu_seqlens), q.shape[2], spec.memory_slots, v.shape[-1], dtype=q.dtype, device=q.device
    )
