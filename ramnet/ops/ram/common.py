"""Pieces shared by the execution paths: token positions, sparse address decoding, varlen split."""

from __future__ import annotations

import torch

from ..address import beam_topk, cape_shift
from ..pdma import proxy_decay
from .spec import RAMSpec
from .state import RAMState


def token_positions(batch: int, seq_len: int, offset: torch.Tensor, cu_seqlens: torch.Tensor | None):
    """Sequence id ``[B, T]`` and absolute position ``[B, T]`` of every token.

    Without ``cu_seqlens`` sequence b is batch row b; with it (B = 1) tokens are packed and each
    sequence counts positions from its own start, continuing from ``offset``.
    """
    t = torch.arange(seq_len, device=offset.device)
    if cu_seqlens is None:
        seq = torch.arange(batch, device=offset.device)[:, None].expand(batch, seq_len)
        return seq, offset[:, None] + t
    seq = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1, device=offset.device), cu_seqlens.diff())[None]
    return seq, t - cu_seqlens[seq] + offset[seq]


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


def run_per_sequence(core, q, k, v, spec: RAMSpec, state: RAMState, cu_seqlens: torch.Tensor | None):
    """Run ``core(q, k, v, spec, state) -> (o, state)`` on each packed sequence of ``cu_seqlens``
    in turn (the stepping paths handle varlen input this way)."""
    if cu_seqlens is None:
        return core(q, k, v, spec, state)
    bounds = cu_seqlens.tolist()
    outputs, finals = [], []
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        o, final = core(q[:, start:end], k[:, start:end], v[:, start:end], spec, state.select(n))
        outputs.append(o)
        finals.append(final)
    return torch.cat(outputs, dim=1), RAMState(*(torch.cat(parts) for parts in zip(*finals)))


def num_sequences(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    return q.shape[0] if cu_seqlens is None else len(cu_seqlens) - 1


def empty_state(q: torch.Tensor, v: torch.Tensor, spec: RAMSpec, cu_seqlens) -> RAMState:
    return RAMState.empty(
        num_sequences(q, cu_seqlens), q.shape[2], spec.memory_slots, v.shape[-1], dtype=q.dtype, device=q.device
    )


def by_row(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, H, ...] -> [B*H, T, ...]``: one row per (batch row, head)."""
    batch, seq_len, heads = x.shape[:3]
    return x.transpose(1, 2).reshape(batch * heads, seq_len, *x.shape[3:])


def sort_events(slots: torch.Tensor, event_seq: torch.Tensor | None, memory_slots: int, num_seqs: int):
    """Stable sort of event slots ``[R, E]`` by (sequence, slot). Returns the sorted slots (in the
    key's integer type: index arithmetic with int64 tensors promotes), the permutation and a flag
    marking where a new (sequence, slot) segment starts.

    One sort of a combined key in the narrowest integer type that holds it: a radix sort then
    makes fewer passes (int16 for the paper's M = 1024)."""
    key_range = memory_slots * (num_seqs if event_seq is not None else 1)
    key_type = next(t for t in (torch.int16, torch.int32, torch.int64) if key_range <= torch.iinfo(t).max + 1)
    key = slots if event_seq is None else event_seq * memory_slots + slots
    sorted_key, perm = torch.sort(key.to(key_type), dim=-1, stable=True)
    boundary = sorted_key[:, 1:] != sorted_key[:, :-1]
    first = torch.ones_like(boundary[:, :1])
    sorted_slots = sorted_key if event_seq is None else sorted_key % memory_slots
    return sorted_slots, perm, torch.cat([first, boundary], dim=1)
