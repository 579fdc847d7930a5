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

import functools

import torch

from ..checks import compute_dtype
from ..triton_support import HAS_TRITON, require_triton
from .common import decode_tokens
from .spec import DEFAULT_PROXY_EPS, RAMSpec, build_spec
from .state import RAMState

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ..address.triton import _forward_meta, _meta, beam_topk_rows

    @triton.jit
    def _write_then_read(S_bh, z_bh, w_idx, w_w, w_dec, r_idx, r_w, live, v_row, o_row, eps, s_m, s_d, z_m,
                         D_V: tl.constexpr, BLOCK_DV: tl.constexpr):
        """The PDMA step of one (sequence, head) from its K write and K read slots ``[K_PAD]``
        (padding: ``live`` false, write slots -1 and read slots -2, so that they never match)."""
        compute = S_bh.dtype.element_ty
        w_w, w_dec, r_w = w_w.to(compute), w_dec.to(compute), r_w.to(compute)
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
            vv = tl.load(v_row + cols, mask=cmask, other=0.0).to(compute)
            w_ptr = S_bh + w_idx[:, None] * s_m + cols[None, :] * s_d
            w_mask = live[:, None] & cmask[None, :]
            S_new = w_dec[:, None] * tl.load(w_ptr, mask=w_mask, other=0.0) + w_w[:, None] * vv[None, :]
            tl.store(w_ptr, S_new, mask=w_mask)
            r_ptr = S_bh + r_idx[:, None] * s_m + cols[None, :] * s_d
            S_r = tl.load(r_ptr, mask=load_r[:, None] & cmask[None, :], other=0.0)
            out = tl.sum(coef_r[:, None] * S_r, axis=0) + tl.sum(coef_w[:, None] * S_new, axis=0)
            tl.store(o_row + cols, out, mask=cmask)  # cast to o's dtype

    @triton.jit
    def _pdma_step_kernel(
        S, z, write_idx, write_w, decay, v, read_idx, read_w, o,
        num_heads, eps,
        s_b, s_h, s_m, s_d, z_b, z_h, z_m,
        K: tl.constexpr, K_PAD: tl.constexpr, D_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):
        # One program per (b, h). Address tensors, v and o are contiguous [B * H, K] / [B * H, d_v].
        row = tl.program_id(0).to(tl.int64)
        slots = tl.arange(0, K_PAD)
        live = slots < K
        at = row * K + slots
        _write_then_read(
            S + (row // num_heads) * s_b + (row % num_heads) * s_h, z + (row // num_heads) * z_b + (row % num_heads) * z_h,
            tl.load(write_idx + at, mask=live, other=-1).to(tl.int64), tl.load(write_w + at, mask=live, other=0.0),
            tl.load(decay + at, mask=live, other=0.0), tl.load(read_idx + at, mask=live, other=-2).to(tl.int64),
            tl.load(read_w + at, mask=live, other=0.0), live, v + row * D_V, o + row * D_V, eps, s_m, s_d, z_m,
            D_V, BLOCK_DV,
        )

    @triton.jit
    def _fused_step_kernel(
        q, k, v, S, z, offset, gamma, cape, o,
        num_heads, eps, tau,
        q_b, q_h, k_b, k_h, v_b, v_h, o_b, o_h,
        s_b, s_h, s_m, s_d, z_b, z_h, z_m,
        U: tl.constexpr, DP: tl.constexpr, DP_PAD: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
        KPB: tl.constexpr, KB: tl.constexpr, K_OUT: tl.constexpr, M: tl.constexpr, INDEX_64: tl.constexpr,
        UNROLL: tl.constexpr, D_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):
        # One program per (b, h): the key's and the query's addresses as the two rows of one decoder
        # tile (lane 0 the key: the write; lane 1 the query: the read), CAPE, the write decay, then the step.
        row = tl.program_id(0).to(tl.int64)
        b, h = row // num_heads, row % num_heads
        lane = tl.arange(0, 2)
        row_ptr = tl.where(lane == 0, k + b * k_b + h * k_h, q + b * q_b + h * q_h)
        score, index = beam_topk_rows(row_ptr, lane < 2, tau, U, DP, DP_PAD, K, KP, KPB, KB, INDEX_64, UNROLL, 2)
        # CAPE: the slot moves by the token's position on the heads that use it, (m - pos) mod M.
        shift = tl.where(tl.load(cape + h) != 0, tl.load(offset + b) % M, 0)
        index = index - shift
        index = tl.where(index < 0, index + M, index)
        weight = tl.exp(score)
        is_write = lane[None, :] == 0
        live = tl.arange(0, KB) < K_OUT
        w_idx = tl.where(live, tl.sum(tl.where(is_write, index, 0), axis=1), -1).to(tl.int64)
        r_idx = tl.where(live, tl.sum(tl.where(is_write, 0, index), axis=1), -2).to(tl.int64)
        w_w = tl.where(live, tl.sum(tl.where(is_write, weight, 0.0), axis=1), 0.0)
        r_w = tl.where(live, tl.sum(tl.where(is_write, 0.0, weight), axis=1), 0.0)
        # The write decay (1 - w) ** gamma (proxy_decay's forward), exact at gamma 0 and 1.
        g = tl.load(gamma + h).to(tl.float32)
        w_dec = tl.where(g == 1.0, 1.0 - w_w, tl.where(g == 0.0, 1.0, tl.exp2(g * tl.log2(1.0 - w_w))))
        _write_then_read(
            S + b * s_b + h * s_h, z + b * z_b + h * z_h, w_idx, w_w, w_dec, r_idx, r_w, live,
            v + b * v_b + h * v_h, o + b * o_b + h * o_h, eps, s_m, s_d, z_m, D_V, BLOCK_DV,
        )


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
    """``_fused_step_kernel``'s compile-time constants and warps for one geometry (computed once:
    the step is on the serving hot path)."""
    meta = _forward_meta(_meta(d_k, num_partitions, topk, has_shift=True), topk)
    _, block_dv, num_warps = _launch_config(topk, d_v)  # its K_PAD is the decoder's KB
    names = ("U", "DP", "DP_PAD", "K", "KP", "KPB", "KB", "K_OUT", "M", "INDEX_64", "UNROLL")
    return dict({name: meta[name] for name in names}, D_V=d_v, BLOCK_DV=block_dv, num_warps=num_warps)


def _fused_step(q, k, v, state: RAMState, spec: RAMSpec) -> torch.Tensor:
    """``_fused_step_kernel``: addresses, CAPE, decay and the PDMA step of one token in one launch."""
    require_triton(q.device, "ram_decode_step")
    batch, heads, d_k = q.shape
    d_v = v.shape[-1]
    o = torch.empty_like(v)
    if batch * heads == 0 or d_v == 0:
        return o
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    S, z = state.S, state.z
    _fused_step_kernel[(batch * heads,)](
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
