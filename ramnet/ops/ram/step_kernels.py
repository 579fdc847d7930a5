"""Jit code of the decoding step (launched by ``step.py`` beside it): one program per (sequence,
head) writes K rows of the PDMA memory in place, then reads K. ``pdma_step_kernel`` takes the
decoded addresses; ``fused_step_kernel`` decodes the key's and the query's addresses itself (the
decoder's ``beam_topk_rows``), applies CAPE and the write decay, then runs the same step.
"""

import triton
import triton.language as tl

from ..address.triton_kernels import beam_topk_rows, cape_shift_slots


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
def pdma_step_kernel(
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
def fused_step_kernel(
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
    log_w, index = beam_topk_rows(row_ptr, lane < 2, tau, U, DP, DP_PAD, K, KP, KPB, KB, INDEX_64, UNROLL, 2)
    # CAPE: the slot moves by the token's position on the heads that use it, (m - pos) mod M.
    index = cape_shift_slots(index, tl.where(tl.load(cape + h) != 0, tl.load(offset + b) % M, 0), M)
    weight = tl.exp(log_w)
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
