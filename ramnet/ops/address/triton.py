"""Fused Triton address decoder: exact beam top-K of the product softmax (``beam.py`` is the torch
reference), the CAPE shift (``cape.py``), and the backward to ``x``.

One program decodes BLOCK_N rows. Every top-k is repeated max + knock-out, because K is small and
``tl.sort`` / ``tl.topk`` are not available in every Triton version we run on. Padded lanes (d_p and
K rounded up to powers of two) hold log-probability -inf, so they never win a max.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_support import require_triton


@triton.jit
def _log_softmax_part(x_ptr, rows, row_mask, stride_x, tau, u: tl.constexpr, DP: tl.constexpr, DP_PAD: tl.constexpr):
    """log p_u for BLOCK_N rows: ``[BLOCK_N, DP_PAD]`` fp32, -inf on the padding."""
    cols = tl.arange(0, DP_PAD)
    col_mask = cols < DP
    ptrs = x_ptr + rows[:, None] * stride_x + u * DP + cols[None, :]
    # Masked-off rows load 0 (not -inf) so they stay finite instead of producing NaN.
    z = tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32) / tau
    z = tl.where(col_mask[None, :], z, float("-inf"))
    z = z - tl.max(z, axis=1)[:, None]
    return z - tl.log(tl.sum(tl.exp(z), axis=1))[:, None]


@triton.jit
def _select_best(score, index, C: tl.constexpr, PICK: tl.constexpr, KB: tl.constexpr, BLOCK_N: tl.constexpr):
    """The PICK best of the C candidate columns of each row, in decreasing order, with their int64
    ``index`` (broadcastable to ``score``), as ``[BLOCK_N, KB]``; unused slots are -inf / 0."""
    cols = tl.arange(0, C)
    slots = tl.arange(0, KB)[None, :]
    best = tl.full([BLOCK_N, KB], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK_N, KB], tl.int64)
    for j in tl.static_range(PICK):
        top, arg = tl.max(score, axis=1, return_indices=True)
        hit = cols[None, :] == arg[:, None]
        best = tl.where(slots == j, top[:, None], best)
        best_index = tl.where(slots == j, tl.sum(tl.where(hit, index, 0), axis=1)[:, None], best_index)
        score = tl.where(hit, float("-inf"), score)
    return best, best_index


@triton.jit
def _unit_shift(shift_ptr, rows, row_mask, M: tl.constexpr):
    """The CAPE shift of each row reduced to [0, M) (whatever sign convention ``%`` has)."""
    s = tl.load(shift_ptr + rows, mask=row_mask, other=0)
    return (s % M + M) % M


@triton.jit
def _beam_topk_fwd(x_ptr, shift_ptr, index_ptr, weight_ptr, n_rows, stride_x, tau,
                   U: tl.constexpr, DP: tl.constexpr, DP_PAD: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                   KPB: tl.constexpr, KB: tl.constexpr, K_OUT: tl.constexpr, M: tl.constexpr, HAS_SHIFT: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    entry = tl.arange(0, DP_PAD)[None, :].to(tl.int64)
    logp = _log_softmax_part(x_ptr, rows, row_mask, stride_x, tau, 0, DP, DP_PAD)
    score, index = _select_best(logp, entry, DP_PAD, KP, KB, BLOCK_N)
    for u in tl.static_range(1, U):
        logp = _log_softmax_part(x_ptr, rows, row_mask, stride_x, tau, u, DP, DP_PAD)
        part, part_index = _select_best(logp, entry, DP_PAD, KP, KPB, BLOCK_N)
        # log rho is a sum over partitions, so the K best (beam, entry) pairs are exactly the K best
        # prefixes. Beams that do not exist yet (fewer than K candidates so far) are -inf and lose.
        cand = tl.reshape(score[:, :, None] + part[:, None, :], [BLOCK_N, KB * KPB])
        cand_index = tl.reshape(index[:, :, None] * DP + part_index[:, None, :], [BLOCK_N, KB * KPB])
        score, index = _select_best(cand, cand_index, KB * KPB, K, KB, BLOCK_N)
    if HAS_SHIFT:
        # (m - s) mod M without leaving [0, 2M): M <= 2**62 keeps this inside int64.
        index = (index - _unit_shift(shift_ptr, rows, row_mask, M)[:, None] + M) % M
    slots = tl.arange(0, KB)[None, :]
    out = rows[:, None] * K_OUT + slots
    out_mask = row_mask[:, None] & (slots < K_OUT)
    tl.store(index_ptr + out, index, mask=out_mask)
    tl.store(weight_ptr + out, tl.exp(score), mask=out_mask)


@triton.jit
def _beam_topk_bwd(x_ptr, shift_ptr, index_ptr, weight_ptr, grad_w_ptr, grad_x_ptr, n_rows, stride_x, tau,
                   U: tl.constexpr, DP: tl.constexpr, DP_PAD: tl.constexpr, KB: tl.constexpr,
                   K_OUT: tl.constexpr, M: tl.constexpr, HAS_SHIFT: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    slots = tl.arange(0, KB)[None, :]
    out = rows[:, None] * K_OUT + slots
    out_mask = row_mask[:, None] & (slots < K_OUT)
    index = tl.load(index_ptr + out, mask=out_mask, other=0)
    if HAS_SHIFT:  # undo CAPE to recover each weight's per-partition entries
        index = (index + _unit_shift(shift_ptr, rows, row_mask, M)[:, None]) % M
    # weight_k = exp(sum_u logp_u[m_{u,k}]): d weight_k / d logp_u[j] = weight_k [m_{u,k} == j].
    gw = tl.load(grad_w_ptr + out, mask=out_mask, other=0.0) * tl.load(weight_ptr + out, mask=out_mask, other=0.0)
    cols = tl.arange(0, DP_PAD)
    for i in tl.static_range(U):
        u = U - 1 - i  # the last partition is the least significant digit: peel it first
        digit = index % DP
        index = index // DP
        dlogp = tl.zeros([BLOCK_N, DP_PAD], tl.float32)
        for k in tl.static_range(K_OUT):  # scatter-add per weight keeps the tile 2-D
            digit_k = tl.sum(tl.where(slots == k, digit, 0), axis=1)
            gw_k = tl.sum(tl.where(slots == k, gw, 0.0), axis=1)
            dlogp += tl.where(cols[None, :] == digit_k[:, None], gw_k[:, None], 0.0)
        p = tl.exp(_log_softmax_part(x_ptr, rows, row_mask, stride_x, tau, u, DP, DP_PAD))
        dx = (dlogp - p * tl.sum(dlogp, axis=1)[:, None]) / tau
        ptrs = grad_x_ptr + rows[:, None] * stride_x + u * DP + cols[None, :]
        tl.store(ptrs, dx.to(grad_x_ptr.dtype.element_ty), mask=row_mask[:, None] & (cols[None, :] < DP))


# Launch shape: rows per program and warps (tuned on an H100 with benchmarks/tune_kernels.py).
ROWS_PER_PROGRAM = 8  # at most; fewer when a tile would pass about 8K fp32 (large d_p or K)
NUM_WARPS = 1


def _meta(d_k: int, num_partitions: int, topk: int, has_shift: bool) -> dict:
    d_p = d_k // num_partitions
    memory_slots = d_p**num_partitions  # exact Python int: M may be 2**62
    dp_pad = triton.next_power_of_2(d_p)
    kb = max(2, triton.next_power_of_2(topk))  # >= 2: no size-1 tiles
    # About 8K fp32 per tile (the d_p row or the K*K candidates), so U=1 with d_p=4096 still fits.
    block_n = max(2, min(32, 8192 // max(dp_pad, kb * kb)))
    if ROWS_PER_PROGRAM is not None:
        block_n = min(block_n, ROWS_PER_PROGRAM)
    return dict(U=num_partitions, DP=d_p, DP_PAD=dp_pad, KB=kb, K_OUT=min(topk, memory_slots),
                M=memory_slots, HAS_SHIFT=has_shift, BLOCK_N=block_n, num_warps=NUM_WARPS)


class _BeamTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, num_partitions, topk, tau):
        meta = _meta(x.shape[1], num_partitions, topk, shift is not None)
        n = x.shape[0]
        index = torch.empty(n, meta["K_OUT"], dtype=torch.int64, device=x.device)
        weight = torch.empty(n, meta["K_OUT"], dtype=torch.float32, device=x.device)
        shift_arg = index if shift is None else shift  # any int64 pointer; unread without HAS_SHIFT
        grid = (triton.cdiv(n, meta["BLOCK_N"]),)
        _beam_topk_fwd[grid](x, shift_arg, index, weight, n, x.stride(0), tau,
                             K=topk, KP=min(topk, meta["DP"]), KPB=max(2, triton.next_power_of_2(min(topk, meta["DP"]))),
                             **meta)
        ctx.mark_non_differentiable(index)
        ctx.save_for_backward(x, shift, index, weight)
        ctx.meta, ctx.tau = meta, tau
        return index, weight

    @staticmethod
    def backward(ctx, grad_index, grad_weight):
        x, shift, index, weight = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        grid = (triton.cdiv(x.shape[0], ctx.meta["BLOCK_N"]),)
        _beam_topk_bwd[grid](x, index if shift is None else shift, index, weight,
                             grad_weight.float().contiguous(), grad_x, x.shape[0], x.stride(0), ctx.tau, **ctx.meta)
        return grad_x, None, None, None, None


def triton_beam_topk(x: torch.Tensor, num_partitions: int, topk: int, tau: float, shift=None):
    """Exact top-K address of each row of ``x [N, d_k]`` (fp32, bf16 or fp16; computed in fp32).

    Returns ``(index int64 [N, K], weight fp32 [N, K])`` equal to ``beam_topk(x.float(), U, K, tau)``
    followed by the CAPE shift ``index = (index - shift) mod M`` when ``shift`` (int64 ``[N]``) is
    given. ``weight`` is differentiable w.r.t. ``x`` (grad in ``x``'s dtype). Callers validate.
    """
    require_triton(x.device, "triton_beam_topk")
    if shift is not None:
        shift = shift.to(torch.int64).contiguous()
    return _BeamTopK.apply(x.contiguous(), shift, int(num_partitions), int(topk), float(tau))
