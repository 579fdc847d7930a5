"""Jit code of the decoding step (launched by ``step.py`` beside it): write K rows of the PDMA memory
in place, then read K, for every (sequence, head). Four layouts (``step.py`` picks one):

- ``pdma_step_kernel``: one program per (b, h) on addresses decoded beforehand (by the torch decoder,
  or by ``decode_pairs_kernel``: the "separate" layout, many rows per decoder program).
- ``fused_step_kernel``: one program per (b, h) decodes the key's and the query's addresses itself
  (lane 0 and 1 of one decoder tile), applies CAPE and the write decay, then runs the step. With
  ``DENSE`` the addresses come from ``dense_topk_rows`` (below) instead of the beam search.
- ``split_step_kernel`` + ``commit_z_kernel``: grid (b, h) x column blocks of d_v; every program
  decodes the addresses (redundantly), and none stores z (see "split" below).
- ``table_step_kernel``: a non-dense state's step (``ramnet/states``) on the token's gathered rows, with
  the addresses of ``decode_pairs_kernel`` in the dense layout's tiles, i.e. ``pdma_step_kernel``'s
  arithmetic (``_write_then_read``) on a table instead of the memory (``table_step``, which the
  host-resident state's kernel also runs before storing the written rows itself).

Why the step is slow at B = 1 (16 programs on 132 SMs). Each program is one serial chain: load q and
k, decode, load z of the written rows, store z, load z of the read rows, then per column block
load the written rows, store them, load the read rows, store o. Bandwidth is no limit (3K rows of
65 floats per head: 100 KB at B = 1), the chain's latency is. Measured on an H200 in a CUDA graph
(idle-clocked, so all numbers high but in proportion): the Triton beam decoder alone on the 32 rows
of B = 1 took 149 us, the step kernel on given addresses 9 us, an empty graph node 5 us, and the
fused step 91 us: the decode is about 90% of it. The beam search runs in one thread per row: U - 1
stages of K serial max / knock-out picks over K * d_p candidates in registers, plus one-hot takes
and a reshape per stage (layout conversions through shared memory), some 30 thousand dependent
cycles. Splitting d_v over more programs shortens only the last, short, part of the chain (one
gathered round trip per block; at d_v 64 there is one block) and repeats the decode in every
program; it cannot help much by itself.

What shortens the chain:
1. ``dense_topk_rows`` (the DENSE option, for M <= ``step.DENSE_MAX_SLOTS``): score all M slots of a
   row at once, spread over every lane (the paper's M = 1024 is 8 scores per thread at 4 warps),
   then K rounds of one max-reduction each, on a 64-bit key that packs the score (made order
   preserving as a signed integer) above ``M - 1 - slot``: the max key is the highest score and among
   equal scores the lowest slot, i.e. the tie rule of ``beam.py`` (exactly its definition:
   ``tests/ops/test_ties.py``'s ``rule_topk``) in one reduction per pick instead of U - 1 stages of
   K picks. Scores are summed from partition 0 in fp32 in the beam's order and the winners' log
   weights are the beam's ``_partition`` log-softmax terms added in the same order, so slots,
   weights and their order are the beam's bit for bit (-0.0 is made +0.0 first so that it ties with
   +0.0 as the float compare does).
2. All loads of a step before any store: z of the written and of the read rows, then the written
   and read rows of S, are independent (the read rows that the step writes are never loaded: they
   come from registers), so they go out together instead of one round trip after another;
   ``_write_then_read`` stores z last.

First measurement (``benchmarks/bench_step_variants.py`` on an H200 at low clocks, do_bench of a CUDA
graph replay, ms; B = 1 and 16 not captured in that run): B = 64: fused 0.150, dense 0.042, split
(16 columns) 0.146, split (32) 0.069, separate 0.136; B = 256: fused 0.355, dense 0.141, split (16)
0.549, split (32) 0.246, separate 0.144. The dense decoder is the gain; splitting d_v repeats the
decode per program and loses as the blocks shrink. ``step.py``'s default is left as it was until
the benchmark has run at working clocks with GDN beside it.

Exactness: the dense decoder is the tie rule by its definition (every slot's fp32 score, the
highest first, the lower slot among equal ones). The beam search gives the same slots whenever its
pruning is exact, which fp32 rounding can break only when two prefixes that differ by an ulp become
equal after an extension (``test_ties.py`` has such a case for x / tau; the beam scores x since);
the tests compare every layout with the torch beam on quarter-grid inputs, whose sums are exact.

Split (``split_step_kernel``): no program knows whether another of its (b, h) has already stored z,
so no program stores z: each reads z of its rows (z_old, read-only in the kernel), computes z_new
itself (the same numbers in every program), uses it for the read coefficients and updates only its
d_v columns of S (disjoint between programs: no race on S). Column block 0 also writes (slot,
z_new) of the K written rows to a ``[B * H, K]`` scratch, and ``commit_z_kernel``, launched after it
on the same stream (so after every program has read z_old), stores them into z and advances
``offset`` (which the decode read for CAPE). Two launches, where the fused step takes one (``_arrive``).
"""

import triton
import triton.language as tl

from ..address.triton_kernels import _log_weights, beam_topk_rows, cape_shift_slots


ARRIVAL = tl.constexpr(1 << 40)  # _arrive's unit: positions stay below it (10**12 tokens)


@triton.jit
def _arrive(offset_b, num_heads):
    """The position ``offset[b]`` for one of the ``num_heads`` programs of sequence b, which together
    advance it by one: each adds ARRIVAL atomically, so the value it gets back holds the position in
    its low bits and how many programs came before it in the high bits; the last to arrive takes the
    heads' ARRIVALs back and adds the token. Every program reads before that last add, and no other
    launch runs in between (stream order), so no program sees another's token."""
    unit = tl.full([], ARRIVAL, tl.int64)
    ticket = tl.atomic_add(offset_b, unit)
    if ticket // unit == num_heads - 1:
        tl.atomic_add(offset_b, 1 - num_heads * unit)
    return ticket % unit


@triton.jit
def _advance(offset, row, num_heads):
    """offset[b] += 1 by the program of head 0 of sequence b (row = b * num_heads + h), for kernels
    launched after every read of offset (the decoder's, for CAPE)."""
    if row % num_heads == 0:
        b = row // num_heads
        tl.store(offset + b, tl.load(offset + b) + 1)


@triton.jit
def _sum_rows_in_order(x):
    """``x [R, C]`` summed over its rows, row 0 first, then 1, ...: the same bits whatever layout the compiler
    gives the tile. (``tl.sum``'s order follows the layout, which follows the kernel around it: the dense
    state's step and a store's step on the same rows, in two kernels, summed in two orders on an H100, and a
    bf16 model's greedy tokens drifted apart.) Each term is taken out of the tile by a sum of one nonzero, which
    is exact."""
    rows = tl.arange(0, x.shape[0])[:, None]
    total = tl.sum(tl.where(rows == 0, x, 0.0), axis=0)
    for j in range(1, x.shape[0]):  # a loop, not unrolled: K rows cost K reductions of the tile
        total += tl.sum(tl.where(rows == j, x, 0.0), axis=0)
    return total


@triton.jit
def _write_then_read(S_bh, z_bh, w_idx, w_w, w_dec, r_idx, r_w, live, v_row, o_row, eps, s_m, s_d, z_m,
                     COL0, D_V: tl.constexpr, BLOCK_DV: tl.constexpr, COLS: tl.constexpr, STORE_Z: tl.constexpr):
    """The PDMA step of one (sequence, head) from its K write and K read slots ``[K_PAD]``
    (padding: ``live`` false, write slots -1 and read slots -2, so that they never match), on the
    columns ``COL0 .. COL0 + COLS`` of d_v (in blocks of BLOCK_DV). Stores z of the written rows
    last when ``STORE_Z``; returns z_new of the written rows."""
    compute = S_bh.dtype.element_ty
    w_w, w_dec, r_w = w_w.to(compute), w_dec.to(compute), r_w.to(compute)
    # hit[r, w]: read slot r is the row written by slot w this step (write slots are distinct,
    # so at most one w per r). Such rows are taken from registers, never re-loaded: this
    # program's own stores are not ordered before its loads across threads, and the split
    # layout's other programs may not have written them yet.
    hit = (r_idx[:, None] == w_idx[None, :]) & live[:, None]
    load_r = live & (tl.sum(hit.to(tl.int32), axis=1) == 0)  # read rows not written this step

    # Every load before any store: none of them reads what this step writes.
    z_w = tl.load(z_bh + w_idx * z_m, mask=live, other=0.0)
    z_r = tl.load(z_bh + r_idx * z_m, mask=load_r, other=0.0)
    z_new = w_dec * z_w + w_w
    z_r += tl.sum(tl.where(hit, z_new[None, :], 0.0), axis=1)
    coef = tl.where(live, r_w / (z_r + eps), 0.0)  # r_k / (z_k + eps) of every read slot
    # o = sum over loaded read rows of coef * S_old + sum over written rows of coef_w * S_new,
    # where coef_w gathers the coefficients of the read slots that hit each written row.
    coef_w = tl.sum(tl.where(hit, coef[:, None], 0.0), axis=0)
    coef_r = tl.where(load_r, coef, 0.0)

    for start in tl.static_range(0, COLS, BLOCK_DV):
        cols = COL0 + start + tl.arange(0, BLOCK_DV)
        cmask = cols < D_V
        w_ptr = S_bh + w_idx[:, None] * s_m + cols[None, :] * s_d
        w_mask = live[:, None] & cmask[None, :]
        r_ptr = S_bh + r_idx[:, None] * s_m + cols[None, :] * s_d
        S_w = tl.load(w_ptr, mask=w_mask, other=0.0)
        S_r = tl.load(r_ptr, mask=load_r[:, None] & cmask[None, :], other=0.0)
        vv = tl.load(v_row + cols, mask=cmask, other=0.0).to(compute)
        S_new = w_dec[:, None] * S_w + w_w[:, None] * vv[None, :]
        tl.store(w_ptr, S_new, mask=w_mask)
        out = _sum_rows_in_order(coef_r[:, None] * S_r) + _sum_rows_in_order(coef_w[:, None] * S_new)
        tl.store(o_row + cols, out, mask=cmask)  # cast to o's dtype
    if STORE_Z:
        tl.store(z_bh + w_idx * z_m, z_new, mask=live)
    return z_new


@triton.jit
def pdma_step_kernel(
    S, z, write_idx, write_w, decay, v, read_idx, read_w, o, offset,
    num_heads, eps, idx_stride,
    s_b, s_h, s_m, s_d, z_b, z_h, z_m,
    K: tl.constexpr, K_PAD: tl.constexpr, D_V: tl.constexpr, BLOCK_DV: tl.constexpr, BUMP_OFFSET: tl.constexpr,
):
    # One program per (b, h). Weights, v and o are contiguous [B * H, K] / [B * H, d_v]; the slot
    # tensors' rows are idx_stride apart (K, or 2K where the decoder wrote both into one [B * H, 2K]).
    # BUMP_OFFSET: the program of head 0 also advances offset[b] (the separate layout's decoder,
    # launched before, has read it).
    row = tl.program_id(0).to(tl.int64)
    b = row // num_heads
    slots = tl.arange(0, K_PAD)
    live = slots < K
    at = row * K + slots
    at_idx = row * idx_stride + slots
    _write_then_read(
        S + b * s_b + (row % num_heads) * s_h, z + b * z_b + (row % num_heads) * z_h,
        tl.load(write_idx + at_idx, mask=live, other=-1).to(tl.int64), tl.load(write_w + at, mask=live, other=0.0),
        tl.load(decay + at, mask=live, other=0.0), tl.load(read_idx + at_idx, mask=live, other=-2).to(tl.int64),
        tl.load(read_w + at, mask=live, other=0.0), live, v + row * D_V, o + row * D_V, eps, s_m, s_d, z_m,
        0, D_V, BLOCK_DV, D_V, True,
    )
    if BUMP_OFFSET:
        _advance(offset, row, num_heads)


@triton.jit
def table_step(table, slots, write_w, decay, v, read_w, o, offset, num_heads, eps, row,
               K: tl.constexpr, K_PAD: tl.constexpr, D_V: tl.constexpr, BLOCK_DV: tl.constexpr,
               BUMP_OFFSET: tl.constexpr):
    """A store's step (ramnet/states) for its (b, h) row ``row``, on the row's table of gathered rows
    ``[R, 2K, d_v + 1]`` (the K written slots' rows, then the K read slots'), ``slots [R, 2K]`` (writes,
    then reads), weights ``[R, K]``, v and o ``[R, d_v]``; the written rows are updated in the table. A
    read of a slot that this token writes is renumbered to the written lane (which _write_then_read takes
    from its registers), every other read to its own row K + j: what pdma_step_kernel does on the dense
    state, with the same tiles, so the same bits. BUMP_OFFSET: the program of head 0 advances offset[b]
    (the decoder, launched before, has read it)."""
    lanes = tl.arange(0, K_PAD)
    live = lanes < K
    at = row * K + lanes
    w_slot = tl.load(slots + row * 2 * K + lanes, mask=live, other=-1)
    r_slot = tl.load(slots + row * 2 * K + K + lanes, mask=live, other=-2)
    hit = (r_slot[:, None] == w_slot[None, :]) & live[:, None]  # write slots are distinct: one w at most
    written_lane = tl.sum(tl.where(hit, lanes[None, :], 0), axis=1)
    r_row = tl.where(tl.max(hit.to(tl.int32), axis=1) > 0, written_lane, K + lanes)
    width = D_V + 1
    base = table + row * 2 * K * width
    _write_then_read(
        base, base + D_V, tl.where(live, lanes, -1).to(tl.int64), tl.load(write_w + at, mask=live, other=0.0),
        tl.load(decay + at, mask=live, other=0.0), tl.where(live, r_row, -2).to(tl.int64),
        tl.load(read_w + at, mask=live, other=0.0), live, v + row * D_V, o + row * D_V, eps, width, 1, width,
        0, D_V, BLOCK_DV, D_V, True,
    )
    if BUMP_OFFSET:
        _advance(offset, row, num_heads)


@triton.jit
def table_step_kernel(
    table, slots, write_w, decay, v, read_w, o, offset, num_heads, eps,
    K: tl.constexpr, K_PAD: tl.constexpr, D_V: tl.constexpr, BLOCK_DV: tl.constexpr, BUMP_OFFSET: tl.constexpr,
):
    # One program per (b, h) row: table_step.
    table_step(table, slots, write_w, decay, v, read_w, o, offset, num_heads, eps, tl.program_id(0).to(tl.int64),
               K, K_PAD, D_V, BLOCK_DV, BUMP_OFFSET)


@triton.jit
def dense_topk_rows(row_ptr, row_mask, tau, U: tl.constexpr, DP: tl.constexpr, DP_PAD: tl.constexpr,
                    K_OUT: tl.constexpr, KB: tl.constexpr, M: tl.constexpr, MB: tl.constexpr, TOP: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """``beam_topk_rows``'s result (``(log weights, slots)``, each ``[KB, BLOCK_N]``, before CAPE) by
    scoring all M slots (M < 2**31, padded to MB): see the module docstring. ``TOP = DP**(U-1)``."""
    m = tl.arange(0, MB)[:, None]
    real = m < M
    mask = real & row_mask[None, :]
    # Scores x_0[d_0] + x_1[d_1] + ... summed from partition 0, d_0 the leading base-DP digit.
    rem = m
    place = TOP
    digit = rem // place
    score = tl.load(row_ptr[None, :] + digit, mask=mask, other=0.0).to(tl.float32)
    for u in tl.static_range(1, U):
        rem = rem - digit * place
        place = place // DP
        digit = rem // place
        score += tl.load(row_ptr[None, :] + u * DP + digit, mask=mask, other=0.0).to(tl.float32)
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 ties with +0.0, as in the float compare
    bits = score.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # as signed integers, in the floats' order
    key = (ordered.to(tl.int64) << 32) | (M - 1 - m).to(tl.int64)
    low = tl.full([MB, BLOCK_N], -2147483648, tl.int64) << 32  # below every real key
    key = tl.where(real, key, low)
    picks = tl.arange(0, KB)[:, None]
    index = tl.zeros([KB, BLOCK_N], tl.int32)
    for j in tl.static_range(K_OUT):
        best = tl.max(key, axis=0)
        index = tl.where(picks == j, (M - 1 - best.to(tl.int32))[None, :], index)  # the low word
        key = tl.where(key == best[None, :], low, key)
    # Log weights: the beam's, from the winners' digits (int32 slots: M <= DENSE_MAX_SLOTS).
    return _log_weights(row_ptr, row_mask, tau, index, U, DP, DP_PAD, False, True), index


@triton.jit
def _pair_addresses(k_row, q_row, shift, g, tau, U: tl.constexpr, DP: tl.constexpr, DP_PAD: tl.constexpr,
                    K: tl.constexpr, KP: tl.constexpr, KPB: tl.constexpr, KB: tl.constexpr, K_OUT: tl.constexpr,
                    M: tl.constexpr, INDEX_64: tl.constexpr, UNROLL: tl.constexpr, DENSE: tl.constexpr,
                    MB: tl.constexpr, TOP: tl.constexpr):
    """The write (key) and read (query) slots and weights of one (b, h), and the write decay:
    ``w_idx, w_w, w_dec, r_idx, r_w, live``, each ``[KB]`` (padding: slots -1 and -2, weights 0)."""
    lane = tl.arange(0, 2)
    row_ptr = tl.where(lane == 0, k_row, q_row)
    if DENSE:
        log_w, index = dense_topk_rows(row_ptr, lane < 2, tau, U, DP, DP_PAD, K_OUT, KB, M, MB, TOP, 2)
    else:
        log_w, index = beam_topk_rows(row_ptr, lane < 2, tau, U, DP, DP_PAD, K, KP, KPB, KB, INDEX_64, UNROLL, 2)
    # CAPE: the slot moves by the token's position on the heads that use it, (m - pos) mod M.
    index = cape_shift_slots(index, shift, M)
    weight = tl.exp(log_w)
    is_write = lane[None, :] == 0
    live = tl.arange(0, KB) < K_OUT
    w_idx = tl.where(live, tl.sum(tl.where(is_write, index, 0), axis=1), -1).to(tl.int64)
    r_idx = tl.where(live, tl.sum(tl.where(is_write, 0, index), axis=1), -2).to(tl.int64)
    w_w = tl.where(live, tl.sum(tl.where(is_write, weight, 0.0), axis=1), 0.0)
    r_w = tl.where(live, tl.sum(tl.where(is_write, 0.0, weight), axis=1), 0.0)
    # The write decay (1 - w) ** gamma (proxy_decay's forward), exact at gamma 0 and 1.
    w_dec = tl.where(g == 1.0, 1.0 - w_w, tl.where(g == 0.0, 1.0, tl.exp2(g * tl.log2(1.0 - w_w))))
    return w_idx, w_w, w_dec, r_idx, r_w, live


@triton.jit
def fused_step_kernel(
    q, k, v, S, z, offset, gamma, cape, o,
    num_heads, eps, tau,
    q_b, q_h, k_b, k_h, v_b, v_h, o_b, o_h,
    s_b, s_h, s_m, s_d, z_b, z_h, z_m,
    U: tl.constexpr, DP: tl.constexpr, DP_PAD: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
    KPB: tl.constexpr, KB: tl.constexpr, K_OUT: tl.constexpr, M: tl.constexpr, INDEX_64: tl.constexpr,
    UNROLL: tl.constexpr, D_V: tl.constexpr, BLOCK_DV: tl.constexpr, DENSE: tl.constexpr, MB: tl.constexpr,
    TOP: tl.constexpr,
):
    # One program per (b, h): the key's and the query's addresses as the two rows of one decoder
    # tile (lane 0 the key: the write; lane 1 the query: the read), CAPE, the write decay, then the step.
    # offset[b] += 1 without a launch of its own: see _arrive.
    row = tl.program_id(0).to(tl.int64)
    b, h = row // num_heads, row % num_heads
    shift = tl.where(tl.load(cape + h) != 0, _arrive(offset + b, num_heads) % M, 0)
    w_idx, w_w, w_dec, r_idx, r_w, live = _pair_addresses(
        k + b * k_b + h * k_h, q + b * q_b + h * q_h, shift, tl.load(gamma + h).to(tl.float32), tau,
        U, DP, DP_PAD, K, KP, KPB, KB, K_OUT, M, INDEX_64, UNROLL, DENSE, MB, TOP)
    _write_then_read(
        S + b * s_b + h * s_h, z + b * z_b + h * z_h, w_idx, w_w, w_dec, r_idx, r_w, live,
        v + b * v_b + h * v_h, o + b * o_b + h * o_h, eps, s_m, s_d, z_m, 0, D_V, BLOCK_DV, D_V, True,
    )


@triton.jit
def split_step_kernel(
    q, k, v, S, z, offset, gamma, cape, o, z_slot, z_val,
    num_heads, eps, tau,
    q_b, q_h, k_b, k_h, v_b, v_h, o_b, o_h,
    s_b, s_h, s_m, s_d, z_b, z_h, z_m,
    U: tl.constexpr, DP: tl.constexpr, DP_PAD: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
    KPB: tl.constexpr, KB: tl.constexpr, K_OUT: tl.constexpr, M: tl.constexpr, INDEX_64: tl.constexpr,
    UNROLL: tl.constexpr, D_V: tl.constexpr, BLOCK_DV: tl.constexpr, DENSE: tl.constexpr, MB: tl.constexpr,
    TOP: tl.constexpr,
):
    # Grid (B * H, column blocks): program (row, j) decodes row's addresses and updates the columns
    # j * BLOCK_DV .. of its written rows; z is read only (z_old); block 0 leaves (slot, z_new) of
    # the written rows in z_slot / z_val [B * H, KB] for commit_z_kernel.
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    b, h = row // num_heads, row % num_heads
    shift = tl.where(tl.load(cape + h) != 0, tl.load(offset + b) % M, 0)
    w_idx, w_w, w_dec, r_idx, r_w, live = _pair_addresses(
        k + b * k_b + h * k_h, q + b * q_b + h * q_h, shift, tl.load(gamma + h).to(tl.float32), tau,
        U, DP, DP_PAD, K, KP, KPB, KB, K_OUT, M, INDEX_64, UNROLL, DENSE, MB, TOP)
    z_new = _write_then_read(
        S + b * s_b + h * s_h, z + b * z_b + h * z_h, w_idx, w_w, w_dec, r_idx, r_w, live,
        v + b * v_b + h * v_h, o + b * o_b + h * o_h, eps, s_m, s_d, z_m, block * BLOCK_DV, D_V, BLOCK_DV,
        BLOCK_DV, False,
    )
    if block == 0:
        slots = row * KB + tl.arange(0, KB)
        tl.store(z_slot + slots, w_idx)  # -1 on the padding: commit_z_kernel skips it
        tl.store(z_val + slots, z_new)


@triton.jit
def commit_z_kernel(z, offset, z_slot, z_val, num_heads, z_b, z_h, z_m, KB: tl.constexpr):
    # One program per (b, h), after split_step_kernel: z of the written rows, and offset[b] += 1
    # (by head 0's program) now that every program has read it.
    row = tl.program_id(0).to(tl.int64)
    b, h = row // num_heads, row % num_heads
    slots = row * KB + tl.arange(0, KB)
    idx = tl.load(z_slot + slots)
    tl.store(z + b * z_b + h * z_h + idx * z_m, tl.load(z_val + slots), mask=idx >= 0)
    _advance(offset, row, num_heads)


@triton.jit
def decode_pairs_kernel(
    q, k, offset, gamma, cape, write_idx, write_w, decay, read_idx, read_w,
    n_pairs, num_heads, tau, idx_stride, q_b, q_h, k_b, k_h,
    U: tl.constexpr, DP: tl.constexpr, DP_PAD: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
    KPB: tl.constexpr, KB: tl.constexpr, K_OUT: tl.constexpr, M: tl.constexpr, INDEX_64: tl.constexpr,
    UNROLL: tl.constexpr, DENSE: tl.constexpr, MB: tl.constexpr, TOP: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The separate layout's decoder: BLOCK_N lanes per program, the key (even lanes) and the query
    # (odd lanes) of BLOCK_N / 2 (b, h) pairs; writes the [B * H, K_OUT] address tensors of
    # pdma_step_kernel (CAPE applied, decay (1 - w) ** gamma as in fused_step_kernel); the slot
    # tensors' rows are idx_stride apart.
    lane = tl.arange(0, BLOCK_N)
    pair = tl.program_id(0).to(tl.int64) * (BLOCK_N // 2) + lane // 2
    ok = pair < n_pairs
    pair = tl.where(ok, pair, 0)
    b, h = pair // num_heads, pair % num_heads
    is_key = (lane % 2) == 0
    row_ptr = tl.where(is_key, k + b * k_b + h * k_h, q + b * q_b + h * q_h)
    if DENSE:
        log_w, index = dense_topk_rows(row_ptr, ok, tau, U, DP, DP_PAD, K_OUT, KB, M, MB, TOP, BLOCK_N)
    else:
        log_w, index = beam_topk_rows(row_ptr, ok, tau, U, DP, DP_PAD, K, KP, KPB, KB, INDEX_64, UNROLL, BLOCK_N)
    shift = tl.where(tl.load(cape + h, mask=ok, other=0) != 0, tl.load(offset + b, mask=ok, other=0) % M, 0)
    index = cape_shift_slots(index, shift[None, :], M).to(tl.int64)
    weight = tl.exp(log_w)
    g = tl.load(gamma + h, mask=ok, other=1.0).to(tl.float32)[None, :]
    dec = tl.where(g == 1.0, 1.0 - weight, tl.where(g == 0.0, 1.0, tl.exp2(g * tl.log2(1.0 - weight))))
    slots = tl.arange(0, KB)[:, None]
    out = pair[None, :] * K_OUT + slots
    keep = ok[None, :] & (slots < K_OUT)
    wk, rk = keep & is_key[None, :], keep & (~is_key)[None, :]
    out_idx = pair[None, :] * idx_stride + slots
    tl.store(write_idx + out_idx, index, mask=wk)
    tl.store(write_w + out, weight, mask=wk)
    tl.store(decay + out, dec, mask=wk)
    tl.store(read_idx + out_idx, index, mask=rk)
    tl.store(read_w + out, weight, mask=rk)
