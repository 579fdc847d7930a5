"""The decoding step for serving, on the kernels of ``step_kernels.py``: ``pdma_step_triton`` does
what ``pdma_step(..., inplace=True)`` (recurrent.py) does in one launch, touching the K written rows
(read and written back) and the K read rows of ``S`` and ``z`` and nothing else;
``ram_decode_step`` decodes one token's addresses and runs the step, in one launch with
``triton_decode``.

Both are for serving: no validation, no host synchronisation and no allocation whose size depends on
the data, so one step can be captured in a CUDA graph and replayed. ``ram_attention(...,
inplace_state=True)`` is the validated entry point for the same step.
"""

from __future__ import annotations

import functools

import torch

from ..checks import compute_dtype
from ..triton_support import HAS_TRITON, require_triton
from .common import decode_tokens
from .spec import DEFAULT_PROXY_EPS, RAMSpec, build_spec
from .state import RAMState

if HAS_TRITON:  # an optional dependency: without it the steps raise require_triton's error
    from ..address.triton import beam_search_constants, decoder_constants
    from . import step_kernels as kernels


def _launch_config(topk: int, d_v: int) -> tuple[int, int, int]:
    """The step kernels' launch shape: K padded to a power of two, the d_v columns per block (tiles
    of at most about 4K entries) and the warps."""
    k_pad = max(2, 1 << (topk - 1).bit_length())
    block_dv = min(max(16, 1 << (d_v - 1).bit_length()), max(16, 4096 // k_pad))
    tile = k_pad * block_dv
    num_warps = 4 if tile >= 2048 else 2 if tile >= 512 else 1
    return k_pad, block_dv, num_warps


def pdma_step_triton(S, z, write_idx, write_w, decay, v, read_idx, read_w, eps: float) -> torch.Tensor:
    """One PDMA step in one kernel: the semantics of ``pdma_step(..., inplace=True)``.

    ``S [B, H, M, d_v]`` and ``z [B, H, M]`` (fp32, or fp64) are updated in place on the K written
    rows only (``new = decay * old + w * [v, 1]``); then ``o = sum_k r_k S[read_k] / (z[read_k] +
    eps)`` over the K read rows, after this step's write. ``write_idx, write_w, decay, read_idx,
    read_w`` are ``[B, H, K]`` (int64 slots, distinct within a row, and float weights), ``v [B, H,
    d_v]`` any float dtype (computed in S's dtype). Returns ``o [B, H, d_v]`` in S's dtype.

    No checks, no host synchronisation: safe to capture in a CUDA graph.
    """
    require_triton(S.device, "pdma_step_triton")
    batch, heads, _, d_v = S.shape
    topk = write_idx.shape[-1]
    o = torch.empty(batch, heads, d_v, dtype=S.dtype, device=S.device)
    if batch * heads == 0 or d_v == 0:
        return o
    k_pad, block_dv, num_warps = _launch_config(topk, d_v)
    kernels.pdma_step_kernel[(batch * heads,)](
        S, z, write_idx.contiguous(), write_w.contiguous(), decay.contiguous(), v.contiguous(),
        read_idx.contiguous(), read_w.contiguous(), o,
        heads, float(eps),
        *S.stride(), *z.stride(),
        K=topk, K_PAD=k_pad, D_V=d_v, BLOCK_DV=block_dv, num_warps=num_warps,
    )
    return o


@torch.no_grad()
def ram_decode_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: RAMState, spec: RAMSpec, *,
    triton_decode: bool | None = None
) -> torch.Tensor:
    """Decode one token per sequence: ``q, k [B, H, d_k]``, ``v [B, H, d_v]``.

    ``state`` (``S``, ``z`` in fp32 or fp64, ``offset`` int64 ``[B]``) is updated in place,
    ``offset += 1`` included; returns ``o [B, H, d_v]`` in v's dtype. The same step as
    ``ram_attention(q[:, None], k[:, None], v[:, None], initial_state=state, inplace_state=True)``
    (which validates its arguments; this function trusts them, never synchronises with the host
    and can be captured in a CUDA graph). ``spec`` comes from ``decode_spec``.

    ``triton_decode`` picks the address decoder. True: decoded inside the step kernel (addresses in
    fp32), so the whole step is that kernel and ``offset += 1``: two launches, where the torch
    decoder takes a dozen small ones (``benchmarks/results/decode_h100.md``). False: the torch
    decoder (in the state's dtype) and then the step kernel. None (default): True for fp32 states,
    False for fp64 ones.
    """
    compute = state.S.dtype
    if triton_decode is None:
        triton_decode = compute != torch.float64
    if triton_decode:
        o = _fused_step(q, k, v, state, spec)
    else:
        write_idx, write_w, decay, read_idx, read_w = decode_tokens(
            q[:, None].to(compute), k[:, None].to(compute), spec, state.offset[:, None]
        )
        o = pdma_step_triton(
            state.S, state.z, write_idx[:, 0], write_w[:, 0], decay[:, 0], v, read_idx[:, 0], read_w[:, 0], spec.eps
        ).to(v.dtype)
    state.offset.add_(1)
    return o


@functools.lru_cache(maxsize=None)
def fused_step_constants(d_k: int, num_partitions: int, topk: int, d_v: int) -> dict:
    """``fused_step_kernel``'s compile-time constants and warps for one geometry (computed once:
    the step is on the serving hot path)."""
    constants = beam_search_constants(decoder_constants(d_k, num_partitions, topk, has_shift=True), topk)
    _, block_dv, num_warps = _launch_config(topk, d_v)  # its K_PAD is the decoder's KB
    names = ("U", "DP", "DP_PAD", "K", "KP", "KPB", "KB", "K_OUT", "M", "INDEX_64", "UNROLL")
    return dict({name: constants[name] for name in names}, D_V=d_v, BLOCK_DV=block_dv, num_warps=num_warps)


def _fused_step(q, k, v, state: RAMState, spec: RAMSpec) -> torch.Tensor:
    """``fused_step_kernel``: addresses, CAPE, decay and the PDMA step of one token in one launch."""
    require_triton(q.device, "ram_decode_step")
    batch, heads, d_k = q.shape
    d_v = v.shape[-1]
    o = torch.empty_like(v)
    if batch * heads == 0 or d_v == 0:
        return o
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    S, z = state.S, state.z
    kernels.fused_step_kernel[(batch * heads,)](
        q, k, v, S, z, state.offset, spec.gamma, spec.cape, o,
        heads, float(spec.eps), float(spec.tau),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        *S.stride(), *z.stride(),
        **fused_step_constants(d_k, spec.num_partitions, spec.topk, d_v),
    )
    return o


def decode_spec(num_heads: int, head_k_dim: int, *, num_partitions: int, topk: int, gamma=1.0, tau: float = 1.0,
                eps: float = 1e-6, proxy_eps: float = DEFAULT_PROXY_EPS, cape=False, device=None,
                dtype: torch.dtype = torch.float32) -> RAMSpec:
    """The ``RAMSpec`` of ``ram_decode_step``, checked once (as ``ram_attention`` checks its
    arguments) so that the steps need not. ``dtype`` is the state's (fp32, or fp64)."""
    return build_spec(num_heads, head_k_dim, num_partitions=num_partitions, topk=topk, gamma=gamma, tau=tau, eps=eps,
                      proxy_eps=proxy_eps, cape=cape, dtype=compute_dtype(dtype), device=device, inplace_state=True)


__all__ = ["decode_spec", "pdma_step_triton", "ram_decode_step"]
