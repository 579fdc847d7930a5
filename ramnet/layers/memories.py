"""The fast-weight memories of the token mixers: RAM-Net (``RAMAttention``'s memory, and the hybrid's
by default) and DeltaNet (the hybrid paper's choice).

Both have the same three methods: ``empty`` (the state before any token), ``run`` (write every
pair and read after the write, for ``[B, T]`` sequences or packed variable-length ones) and
``read`` (read a state without writing).
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from ..ops import RAMState, address_decode
from ..ops.address import cape_shift
from ..ops.checks import check_choice, check_int, compute_dtype
from ..ops.ram.common import run_per_sequence
from ..ops.ram.interface import PATHS, run_ram_attention
from ..ops.ram.recurrent import recurrent_forward
from ..ops.ram.spec import RAMSpec, build_spec
from ..ops.ram.step import ram_decode_step
from ..ops.triton_support import triton_runs_on
from ..states.base import SlotStore


class RAMMemory:
    """RAM-Net as the fast-weight memory: the RAM attention op to write (and read what was just
    written), plus a read-only access to a state, which the op has no way to express (every
    step of the op writes).

    Built from a layer's hyperparameters, and checks them: keys of ``d_k = num_partitions *
    partition_dim`` address ``M = partition_dim ** num_partitions`` slots, ``topk`` in [1, M],
    ``cape`` a bool for all heads or one per head (kept as ``cape``, a tuple of bools), ``mode``
    one of the op's paths or None, and the op's rules for the rest (``build_spec``).

    The op's ``RAMSpec`` depends on these hyperparameters only, so it is built once, here, and
    not on every forward as ``ram_attention`` would (building it checks gamma on the device, a
    host synchronisation); ``spec`` hands out copies on each device and compute dtype used.
    """

    def __init__(self, num_heads: int, head_v_dim: int, num_partitions: int, partition_dim: int, topk: int,
                 gamma, tau, eps, proxy_eps, cape: bool | Sequence[bool], mode: str | None):
        for name, value in (("num_heads", num_heads), ("head_v_dim", head_v_dim), ("partition_dim", partition_dim)):
            check_int(name, value, 1)
        self.num_heads, self.head_v_dim, self.head_k_dim = num_heads, head_v_dim, num_partitions * partition_dim
        self.mode = check_choice("mode", mode, (None, *sorted(PATHS)))
        # On the CPU whatever the default device (a model may be built on "meta"), gamma in fp64 so
        # that casting it to the compute dtype rounds it as building it there would.
        self._spec = build_spec(
            num_heads, self.head_k_dim, num_partitions=num_partitions, topk=topk, gamma=gamma, tau=tau, eps=eps,
            proxy_eps=proxy_eps, cape=cape, dtype=torch.float64, device=torch.device("cpu"),
        )
        self.cape = tuple(self._spec.cape.tolist())
        self.memory_slots, self.topk = self._spec.memory_slots, self._spec.topk
        self._specs: dict[tuple, RAMSpec] = {}

    def spec(self, like: torch.Tensor, inplace_state: bool = False) -> RAMSpec:
        """The spec for inputs like ``like``: on its device, gamma in its compute dtype."""
        key = (like.device, compute_dtype(like.dtype), inplace_state)
        if key not in self._specs:
            base = self._spec
            spec = replace(base, gamma=base.gamma.to(like.device, key[1]), cape=base.cape.to(like.device),
                           inplace_state=inplace_state)
            # The spec's tensors never change: marked static, a CUDA graph of the decode step
            # (torch.compile's cudagraphs) reads them in place instead of copying them in each replay.
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(spec.gamma)
                torch._dynamo.mark_static_address(spec.cape)
            self._specs[key] = spec
        return self._specs[key]

    def empty(self, batch: int, like: torch.Tensor) -> RAMState:
        return RAMState.empty(
            batch, self.num_heads, self.memory_slots, self.head_v_dim, dtype=compute_dtype(like.dtype),
            device=like.device,
        )

    def run(self, q, k, v, beta, state, cu_seqlens, output_final_state: bool):
        """Write every (k_t, v_t) and read with q_t after the write (beta is DeltaNet's; unused):
        ``run_ram_attention`` with this memory's spec, so the inputs' shapes, dtypes and devices are checked
        as ``ram_attention`` checks them, but neither the hyper-parameters (checked once, here) nor the
        inputs' values (a host synchronisation each) on every call. A non-dense ``state``
        (a ``SlotStore``: ``RAMNetCache(ram_state="sparse" | "offload")``) runs the call itself."""
        if isinstance(state, SlotStore):
            return state.run(self, q, k, v, cu_seqlens)
        # Decoding: update the K touched rows of the cached state instead of copying all M
        # (the op's recurrent path only, without autograd).
        inplace = (state is not None and q.shape[1] == 1 and cu_seqlens is None and self.steps_in_place
                   and not torch.is_grad_enabled())
        if output_final_state:
            # The state will be decoded from: the step's spec is built now, eagerly, so that a compiled
            # decoding step finds it instead of adding it (a change that would make torch.compile trace again).
            self.spec(q, inplace_state=True)
        # check_values=False: q, k, v are this layer's projections and state its cache; scanning their values
        # would synchronise with the GPU several times a layer in every training step and prefill.
        return run_ram_attention(q, k, v, self.spec(q, inplace), initial_state=state,
                                 output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                 mode="recurrent" if inplace else self.mode, check_values=False)

    @property
    def steps_in_place(self) -> bool:
        """Whether ``step`` serves this memory's one-token decoding steps: for ``mode`` None, "triton"
        and "recurrent"; "naive" and "parallel" (reference paths, chosen to check the others) keep
        the validated op for every call."""
        return self.mode in (None, "triton", "recurrent")

    def steps_on_kernels(self, device) -> bool:
        """Whether ``step`` runs the Triton step kernels on ``device`` (a store's step follows suit)."""
        return self.mode != "recurrent" and triton_runs_on(device)

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: RAMState) -> torch.Tensor:
        """One decoding token per sequence, ``q, k [B, H, d_k]``, ``v [B, H, d_v]``: ``state`` (S, z in
        the compute dtype, offset) is updated in place, ``offset += 1`` included; returns ``o [B, H,
        d_v]`` in v's dtype. The op's semantics, without its checks: the state is one the op made
        (the prefill) or a cache allocated from it, q, k and v come from the layer's projections,
        and the spec was checked once, when this memory was built. So nothing here reads a tensor's
        values on the host, and one step can be captured in a CUDA graph.

        Where Triton runs (CUDA, or the CPU under TRITON_INTERPRET=1) and ``mode`` is not
        "recurrent": ``ram_decode_step``, the fused kernel. Otherwise the op's recurrent path, one
        step in place (on the CPU the torch step; on CUDA the Triton decoder and step kernel). A non-dense
        state (a ``SlotStore``) runs the step itself, through its slot map or cache."""
        if isinstance(state, SlotStore):
            return state.step(self, q, k, v)
        spec = self.spec(q, inplace_state=True)
        if self.steps_on_kernels(q.device):
            return ram_decode_step(q, k, v, state, spec)
        compute = state.S.dtype
        o, _ = recurrent_forward(q[:, None].to(compute), k[:, None].to(compute), v[:, None].to(compute), spec, state,
                                 True, None)
        return o[:, 0].to(v.dtype)

    def read(self, q: torch.Tensor, positions: torch.Tensor, state: RAMState, rows: torch.Tensor) -> torch.Tensor:
        """Read ``q [N, H, d_k]`` (CAPE at ``positions [N]``) from the states of ``rows [N]``:
        ``sum_k r_k S[i_k] / (z[i_k] + eps)``, touching only the K slots read."""
        compute = state.S.dtype
        spec = self.spec(q)
        index, weight = address_decode(q.to(compute), num_partitions=spec.num_partitions, topk=spec.topk, tau=spec.tau)
        index = cape_shift(index[None], positions[None], spec.cape, self.memory_slots)[0]  # [N, H, K]
        heads = torch.arange(self.num_heads, device=q.device)
        flat = (rows[:, None, None] * self.num_heads + heads[None, :, None]) * self.memory_slots + index
        values = state.S.reshape(-1, self.head_v_dim)[flat]
        norms = state.z.reshape(-1)[flat]
        return (weight[..., None] * values / (norms[..., None] + spec.eps)).sum(-2).to(q.dtype)


class DeltaState(NamedTuple):
    """DeltaNet's fast weights ``S [N, H, d_k, d_v]`` (fp32, fp64 for fp64 input), fla's layout."""

    S: torch.Tensor


@cache
def _fla_chunk_delta_rule():
    try:
        from fla.ops.delta_rule import chunk_delta_rule
    except ImportError:
        return None
    return chunk_delta_rule


def delta_rule(q, k, v, beta, scale: float, S: torch.Tensor):
    """The delta rule, one step at a time: ``S <- S + k_t (beta_t (v_t - S^T k_t))^T``, then
    ``o_t = scale * S^T q_t`` (the read sees the write). ``q, k [B, T, H, d_k]`` (normalised by the
    caller), ``v [B, T, H, d_v]``, ``beta [B, T, H]``, ``S [B, H, d_k, d_v]``; all in S's dtype."""
    outputs = []
    for t in range(q.shape[1]):
        error = v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t, :, None] * error)
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outputs, 1), S


DELTANET_ACTIVATIONS = ("silu", "identity")


def _delta_rule_kernel(like: torch.Tensor):
    """fla's ``chunk_delta_rule`` for CUDA inputs when fla is installed, else None (the torch rule).
    One function so that a test can stand in for the kernel and see what it is given."""
    return _fla_chunk_delta_rule() if like.is_cuda else None


class DeltaRuleMemory:
    """DeltaNet as the fast-weight memory (the hybrid paper's choice): a feature map on q, k and v,
    L2-normalised q and k, a write strength beta per token and head, scale ``d_k ** -0.5`` as in fla.
    fla's ``chunk_delta_rule`` on CUDA when fla is installed, the step-by-step torch rule otherwise;
    both get the same mapped inputs (``features``).

    ``activation``: ``"silu"`` (the paper's DeltaNet, fla's default: SiLU on q and k before the L2
    norm, SiLU on v) or ``"identity"`` (raw projections; what this memory computed before the SiLU
    was added, kept so that checkpoints trained that way still load as they were trained). The
    hybrid's KV memory reads the raw q, k, v: the map belongs to this memory only."""

    def __init__(self, num_heads: int, head_k_dim: int, head_v_dim: int, activation: str = "silu"):
        self.num_heads, self.head_k_dim, self.head_v_dim = num_heads, head_k_dim, head_v_dim
        self.activation = check_choice("activation", activation, DELTANET_ACTIVATIONS)
        self.scale = head_k_dim**-0.5

    def empty(self, batch: int, like: torch.Tensor) -> DeltaState:
        shape = (batch, self.num_heads, self.head_k_dim, self.head_v_dim)
        return DeltaState(torch.zeros(shape, dtype=compute_dtype(like.dtype), device=like.device))

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x) if self.activation == "silu" else x

    def features(self, q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None):
        """What the delta rule sees, in the compute dtype: ``normalize(act(q))``, ``normalize(act(k))``
        and ``act(v)`` (None stays None)."""
        compute = compute_dtype(q.dtype)
        q, k = (None if x is None else F.normalize(self._act(x.to(compute)), dim=-1) for x in (q, k))
        return q, k, None if v is None else self._act(v.to(compute))

    def run(self, q, k, v, beta, state, cu_seqlens, output_final_state: bool):
        dtype = v.dtype
        compute = compute_dtype(dtype)
        q, k, v = self.features(q, k, v)
        num_seqs = q.shape[0] if cu_seqlens is None else len(cu_seqlens) - 1
        S0 = (state if state is not None else self.empty(num_seqs, v)).S
        kernel = _delta_rule_kernel(q)
        if kernel is not None:
            o, final = kernel(
                q.to(dtype), k.to(dtype), v.to(dtype), beta.to(dtype), scale=self.scale, initial_state=S0,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens,
            )
            return o.to(dtype), (DeltaState(final) if output_final_state else None)
        beta = beta.to(compute)

        def one_sequence(q, k, v, beta, S):  # the delta rule loops over T, which may be 0 for a packed sequence
            return delta_rule(q, k, v, beta, self.scale, S) if q.shape[1] else (v, S)

        o, final = run_per_sequence(one_sequence, (q, k, v, beta), S0, cu_seqlens)
        return o.to(dtype), (DeltaState(final) if output_final_state else None)

    def read(self, q: torch.Tensor, positions: torch.Tensor, state: DeltaState, rows: torch.Tensor) -> torch.Tensor:
        """``scale * S^T q'`` for ``q [N, H, d_k]`` (``q'`` its features, as ``run`` reads with) from the
        states of ``rows [N]`` (positions unused)."""
        unit = self.features(q.to(state.S.dtype))[0]
        return (self.scale * torch.einsum("nhk,nhkv->nhv", unit, state.S[rows])).to(q.dtype)


__all__ = ["DELTANET_ACTIVATIONS", "DeltaRuleMemory", "DeltaState", "RAMMemory", "delta_rule"]
