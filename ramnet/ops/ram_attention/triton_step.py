"""The decoding step as one Triton kernel: write K rows of the PDMA memory in place, then read K.

``pdma_step_triton`` does what ``pdma_step(..., inplace=True)`` (recurrent.py) does in one launch,
one program per (sequence, head): it touches the K written rows (read and written back) and the K
read rows of ``S`` and ``z`` and nothing else. ``ram_decode_step`` decodes one token's addresses
(``decode_tokens``) and runs the kernel.

Both are for serving: no validation, no host synchronisation and no allocation whose size depends on
the data, so one step can be captured in a CUDA graph and replayed. ``ram_attention(...,
inplace_state=True)`` is the validated entry point for the same step.
"""

from __future__ import annotations

import torch

from ..checks import compute_dtype
from ..triton_support import HAS_TRITON, require_triton
from .common import decode_tokens
from .spec import DEFAULT_PROXY_EPS, RAMSpec, build_spec
from .state import RAMState

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _pdma_step_kernel(
        S, z, write_idx, write_w, decay, v, read_idx, read_w, o,
        num_heads, eps,
        s_b, s_h, s_m, s_d, z_b, z_h, z_m,
        K: tl.constexpr, K_PAD: tl.constexpr, D_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):
        # One program per (b, h). Address tensors, v and o are contiguous [B * H, K] / [B * H, d_v].
        pid = tl.program_id(0)
        row = pid.to(tl.int64)
        S_bh = S + (row // num_heads) * s_b + (row % num_heads) * s_h
        z_bh = z + (row // num_heads) * z_b + (row % num_heads) * z_h
        compute = S.dtype.element_ty

        slots = tl.arange(0, K_PAD)
        live = slots < K
        at = row * K + slots
        # Different fill values, so that padded read and write slots never match each other.
        w_idx = tl.load(write_idx + at, mask=live, other=-1).to(tl.int64)
        r_idx = tl.load(read_idx + at, mask=live, other=-2).to(tl.int64)
        w_w = tl.load(write_w + at, mask=live, other=0.0).to(compute)
        w_dec = tl.load(decay + at, mask=live, other=0.0).to(compute)
        r_w = tl.load(read_w + at, mask=live, other=0.0).to(compute)

        # hit[r, w]: read slot r is the row written by slot w this step (write slots are distinct,
        # so at most one w per r). Such rows are taken from registers, never re-loaded: this
        # program's own stores are not ordered before its loads across threads.
        hit = (r_idx[:, None] == w_idx[None, :]) & live[:, None]
        load_r = live & (tl.sum(hit.to(tl.int32), axis=1) == 0)  # read rows not written this step

        z_new = w_dec * tl.load(z_bh + w_idx * z_m, mask=live, other=0.0) + w_w
        tl.store(z_bh + w_idx * z_m, z_new, mask=live)
        z_r = tl.load(z_bh + r_idx * z_m, mask=load_r, other=0.0)
        z_r += tl.sum(tl.where(hit, z_new[None, :], 0.0), axis=1)
        coef = tl.where(live, r_w / (z_r + eps), 0.0)  # r_k / (z_k + eps) of every read slot
        # o = sum over loaded read rows of coef * S_old + sum over written rows of coef_w * S_new,
        # where coef_w gathers the coefficients of the read slots that hit each written row.
        coef_w = tl.sum(tl.where(hit, coef[:, None], 0.0), axis=0)
        coef_r = tl.where(load_r, coef, 0.0)

        for start in tl.static_range(0, D_V, BLOCK_DV):
            cols = start + tl.arange(0, BLOCK_DV)
            cmask = cols < D_V
            vv = tl.load(v + row * D_V + cols, mask=cmask, other=0.0).to(compute)
            w_ptr = S_bh + w_idx[:, None] * s_m + cols[None, :] * s_d
            w_mask = live[:, None] & cmask[None, :]
            S_new = w_dec[:, None] * tl.load(w_ptr, mask=w_mask, other=0.0) + w_w[:, None] * vv[None, :]
            tl.store(w_ptr, S_new, mask=w_mask)
            r_ptr = S_bh + r_idx[:, None] * s_m + cols[None, :] * s_d
            S_r = tl.load(r_ptr, mask=load_r[:, None] & cmask[None, :], other=0.0)
            out = tl.sum(coef_r[:, None] * S_r, axis=0) + tl.sum(coef_w[:, None] * S_new, axis=0)
            tl.store(o + row * D_V + cols, out, mask=cmask)


def _launch_config(topk: int, d_v: int) -> tuple[int, int, int]:
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
    _pdma_step_kernel[(batch * heads,)](
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

    ``triton_decode`` picks the address decoder: the fused Triton one (computes in fp32) or the
    torch one; None (default) takes the Triton decoder for fp32 states, which on an H100 halves the
    step in a CUDA graph (benchmarks/results/decode.md), and torch for fp64 states.
    """
    compute = state.S.dtype
    if triton_decode is None:
        triton_decode = compute != torch.float64
    write_idx, write_w, decay, read_idx, read_w = decode_tokens(
        q[:, None].to(compute), k[:, None].to(compute), spec, state.offset[:, None], use_triton=triton_decode
    )
    o = pdma_step_triton(
        state.S, state.z, write_idx[:, 0], write_w[:, 0], decay[:, 0], v, read_idx[:, 0], read_w[:, 0], spec.eps
    )
    state.offset.add_(1)
    return o.to(v.dtype)


def decode_spec(num_heads: int, head_k_dim: int, *, num_partitions: int, topk: int, gamma=1.0, tau: float = 1.0,
                eps: float = 1e-6, proxy_eps: float = DEFAULT_PROXY_EPS, cape=False, device=None,
                dtype: torch.dtype = torch.float32) -> RAMSpec:
    """The ``RAMSpec`` of ``ram_decode_step``, checked once (as ``ram_attention`` checks its
    arguments) so that the steps need not. ``dtype`` is the state's (fp32, or fp64)."""
    return build_spec(num_heads, head_k_dim, num_partitions=num_partitions, topk=topk, gamma=gamma, tau=tau, eps=eps,
                      proxy_eps=proxy_eps, cape=cape, dtype=compute_dtype(dtype), device=device, inplace_state=True)


__all__ = ["decode_spec", "pdma_step_triton", "ram_decode_step"]
