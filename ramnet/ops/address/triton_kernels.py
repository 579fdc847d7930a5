"""Jit code of the fused Triton address decoder (launched by ``triton.py`` beside it): exact beam
top-K of the product softmax (``beam.py`` is the torch reference), the CAPE shift (``cape.py``), and
the backward to ``x``. ``beam_topk_rows`` and ``cape_shift_slots`` are also the decoding step's
(``ops/ram/step_kernels.py``).

One program decodes BLOCK_N rows. Tiles are ``[candidates, rows]``: with rows on the last axis,
Triton lays a row's candidates out in one thread's registers, so the top-K picks are compares
inside a thread instead of shuffles across threads (4-6x fewer instructions per row than
``[rows, candidates]`` tiles in the sm_90 SASS of Triton 3.6-3.9). Every top-k is repeated max +
knock-out (the lowest slot among the candidates at the max: the tie rule of ``beam.py``), because K
is small and ``tl.sort`` / ``tl.topk`` are not available in every Triton version we run on. Padded
lanes (d_p and K rounded up to powers of two) hold log-probability -inf, so they never win a max.
Slot indices are int32 inside the kernels unless M >= 2**31.
"""

import triton
import triton.language as tl


# Up to this d_p the decoder's softmax sums in a fixed order (DP reductions of the partition's tile, so DP**2 work;
# d_p is 4 at the paper's shapes). Above it, tl.sum's order: a store's decoding step may then differ from the dense
# step's in the last bits.
ORDERED_SUM_MAX_DP = tl.constexpr(16)


@triton.jit
def _partition(row_ptr, row_mask, tau, u, DP: tl.constexpr, DP_PAD: tl.constexpr):
    """Partition u of BLOCK_N rows starting at the pointers ``row_ptr [BLOCK_N]``: its entries ``x``
    (the tie rule's score terms, ``beam.py``) and log-softmax ``log p_u`` at temperature ``tau``,
    both ``[DP_PAD, BLOCK_N]`` fp32 and -inf on the padding. (Row pointers, not one base and a
    stride: the decoding step decodes a key and a query from two tensors in one tile.)"""
    cols = tl.arange(0, DP_PAD)[:, None]
    col_mask = cols < DP
    ptrs = row_ptr[None, :] + u * DP + cols
    # Masked-off rows load 0 (not -inf) so they stay finite instead of producing NaN.
    x = tl.load(ptrs, mask=col_mask & row_mask[None, :], other=0.0).to(tl.float32)
    x = tl.where(col_mask, x, float("-inf"))
    z = x / tau
    z = z - tl.max(z, axis=0)[None, :]
    e = tl.exp(z)
    if DP <= ORDERED_SUM_MAX_DP:
        # The softmax's sum column after column (each taken out by a sum of one nonzero, exact), not tl.sum's
        # layout-dependent order: the decoding step decodes in two kernels for a non-dense state, and both must
        # give the same bits (ops/ram/step_kernels.py's _sum_rows_in_order says why).
        total = tl.sum(tl.where(cols == 0, e, 0.0), axis=0)
        for d in tl.static_range(1, DP):
            total += tl.sum(tl.where(cols == d, e, 0.0), axis=0)
    else:
        total = tl.sum(e, axis=0)
    return x, z - tl.log(total)[None, :]


@triton.jit
def _select_best(score, slot, C: tl.constexpr, PICK: tl.constexpr, KB: tl.constexpr, BLOCK_N: tl.constexpr):
    """The PICK best of the C candidates (axis 0) of each row by the tie rule (``beam.py``):
    decreasing score, and among equal scores the lower slot. ``slot [C, BLOCK_N]`` (or ``[C, 1]``)
    is each candidate's slot, distinct among a row's real candidates. Returns their scores, slots
    and candidate numbers (int32), each ``[KB, BLOCK_N]`` in that order; unused picks are -inf."""
    cands = tl.arange(0, C)[:, None]
    slots = tl.arange(0, KB)[:, None]
    best = tl.full([KB, BLOCK_N], float("-inf"), tl.float32)
    best_slot = tl.zeros([KB, BLOCK_N], slot.dtype)
    best_cand = tl.zeros([KB, BLOCK_N], tl.int32)
    above = tl.max(slot, axis=0)[None, :] + 1  # above every slot: never the lowest of a tie
    for j in tl.static_range(PICK):
        top = tl.max(score, axis=0)
        low, arg = tl.min(tl.where(score == top[None, :], slot, above), axis=0, return_indices=True)
        best = tl.where(slots == j, top[None, :], best)
        best_slot = tl.where(slots == j, low[None, :], best_slot)
        best_cand = tl.where(slots == j, arg[None, :], best_cand)
        score = tl.where(cands == arg[None, :], float("-inf"), score)
    return best, best_slot, best_cand


@triton.jit
def _extend_beams(row_ptr, row_mask, tau, u, score, index, DP: tl.constexpr, DP_PAD: tl.constexpr, K: tl.constexpr,
                  KP: tl.constexpr, KPB: tl.constexpr, KB: tl.constexpr, BLOCK_N: tl.constexpr):
    """One beam stage: the K best prefixes over partitions 0..u from those over 0..u-1, with their
    scores."""
    entries = _partition(row_ptr, row_mask, tau, u, DP, DP_PAD)[0]
    part, part_entry, _ = _select_best(entries, tl.arange(0, DP_PAD)[:, None], DP_PAD, KP, KPB, BLOCK_N)
    # The score is a sum over partitions, so the K best (beam, entry) pairs are exactly the K best
    # prefixes. Beams that do not exist yet (fewer than K candidates so far) are -inf and lose.
    cand = tl.reshape(score[:, None, :] + part[None, :, :], [KB * KPB, BLOCK_N])
    cand_slot = tl.reshape(index[:, None, :] * DP + part_entry[None, :, :].to(index.dtype), [KB * KPB, BLOCK_N])
    score, index, _ = _select_best(cand, cand_slot, KB * KPB, K, KB, BLOCK_N)
    return score, index


@triton.jit
def _log_weights(row_ptr, row_mask, tau, index, U: tl.constexpr, DP: tl.constexpr, DP_PAD: tl.constexpr,
                 INDEX_64: tl.constexpr, UNROLL: tl.constexpr):
    """The log weights ``[KB, BLOCK_N]`` of the slots ``index`` (before CAPE): partition u's log-softmax at
    the slot's base-d_p digit u (the leading digit is partition 0), added from partition 0 on in fp32, the
    order in which a beam would carry them. Computed once after the search rather than carried with the
    beams: carrying them held each stage's K * KP candidate log weights beside their scores, and at the
    paper's shape the sm_90 SASS of the forward doubled (17.9k instructions against 8.5k, 255 registers and a
    344-byte stack against 181 and none, Triton 3.9) when 3bc9c1f added them."""
    cols = tl.arange(0, DP_PAD)[None, :, None]
    rem = index
    if INDEX_64 or not UNROLL:  # d_p ** (U - 1) in an int64 scalar (a constexpr that large is not one here)
        place = tl.full([], 1, tl.int64)
        for _ in range(U - 1):
            place = place * DP
    else:  # a constant: the digits by constant divisions
        place = 1
        for _ in tl.static_range(U - 1):
            place = place * DP
    if UNROLL:
        for u in tl.static_range(U):
            digit = rem // place
            rem = rem - digit * place
            place = place // DP
            logp = _partition(row_ptr, row_mask, tau, u, DP, DP_PAD)[1]
            # one nonzero per sum: the term itself, exactly
            term = tl.sum(tl.where(digit[:, None, :] == cols, logp[None, :, :], 0.0), axis=1)
            if u == 0:
                log_w = term
            else:
                log_w = log_w + term
    else:  # many partitions: a loop; 0.0 + the first term is that term
        log_w = tl.zeros(index.shape, tl.float32)
        for u in range(U):
            digit = rem // place
            rem = rem - digit * place
            place = place // DP
            logp = _partition(row_ptr, row_mask, tau, u, DP, DP_PAD)[1]
            log_w += tl.sum(tl.where(digit[:, None, :] == cols, logp[None, :, :], 0.0), axis=1)
    return log_w


@triton.jit
def beam_topk_rows(row_ptr, row_mask, tau, U: tl.constexpr, DP: tl.constexpr, DP_PAD: tl.constexpr,
                   K: tl.constexpr, KP: tl.constexpr, KPB: tl.constexpr, KB: tl.constexpr,
                   INDEX_64: tl.constexpr, UNROLL: tl.constexpr, BLOCK_N: tl.constexpr):
    """The beam top-K of BLOCK_N rows (``row_ptr [BLOCK_N]`` pointers to their d_k logits), before
    any CAPE shift: ``(log weights, slot indices)``, each ``[KB, BLOCK_N]`` in the tie rule's order
    (decreasing score, then increasing slot)."""
    entries = _partition(row_ptr, row_mask, tau, 0, DP, DP_PAD)[0]
    score, index, _ = _select_best(entries, tl.arange(0, DP_PAD)[:, None], DP_PAD, KP, KB, BLOCK_N)
    if INDEX_64:  # slot indices need 64 bits only when M >= 2**31
        index = index.to(tl.int64)
    if UNROLL:
        for u in tl.static_range(1, U):
            score, index = _extend_beams(row_ptr, row_mask, tau, u, score, index, DP, DP_PAD, K, KP, KPB, KB, BLOCK_N)
    else:  # many partitions: a loop, since unrolling them all takes minutes to compile
        for u in range(1, U):
            score, index = _extend_beams(row_ptr, row_mask, tau, u, score, index, DP, DP_PAD, K, KP, KPB, KB, BLOCK_N)
    return _log_weights(row_ptr, row_mask, tau, index, U, DP, DP_PAD, INDEX_64, UNROLL), index


@triton.jit
def cape_shift_slots(index, shift, M: tl.constexpr):
    """CAPE on slot indices: ``(index - shift) mod M`` for ``shift`` already in ``[0, M)`` (reduced
    on the host or by the caller), so a compare instead of an int64 remainder."""
    index = index - shift
    return tl.where(index < 0, index + M, index)


@triton.jit
def beam_topk_fwd_kernel(x_ptr, shift_ptr, index_ptr, weight_ptr, n_rows, stride_x, tau,
                   U: tl.constexpr, DP: tl.constexpr, DP_PAD: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                   KPB: tl.constexpr, KB: tl.constexpr, K_OUT: tl.constexpr, M: tl.constexpr, HAS_SHIFT: tl.constexpr,
                   INDEX_64: tl.constexpr, UNROLL: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    log_w, index = beam_topk_rows(x_ptr + rows * stride_x, row_mask, tau, U, DP, DP_PAD, K, KP, KPB, KB,
                                  INDEX_64, UNROLL, BLOCK_N)
    if HAS_SHIFT:
        index = cape_shift_slots(index, tl.load(shift_ptr + rows, mask=row_mask, other=0)[None, :], M)
    slots = tl.arange(0, KB)[:, None]
    out = rows[None, :] * K_OUT + slots
    out_mask = row_mask[None, :] & (slots < K_OUT)
    tl.store(index_ptr + out, index.to(tl.int64), mask=out_mask)
    tl.store(weight_ptr + out, tl.exp(log_w), mask=out_mask)


@triton.jit
def _partition_grad(row_ptr, grad_row_ptr, row_mask, tau, u, index, gw, DP: tl.constexpr, DP_PAD: tl.constexpr):
    """Writes the gradient of partition u's logits, whose entry is ``index``'s last base-d_p digit
    (the partitions are peeled from the last, the least significant); returns ``index // d_p``."""
    cols = tl.arange(0, DP_PAD)[:, None]
    digit = index % DP
    # dlogp[j, n] = sum over the K weights whose digit u is j: one [K, d_p, rows] reduction.
    dlogp = tl.sum(tl.where(digit[:, None, :] == cols[None, :, :], gw[:, None, :], 0.0), axis=0)
    p = tl.exp(_partition(row_ptr, row_mask, tau, u, DP, DP_PAD)[1])
    dx = (dlogp - p * tl.sum(dlogp, axis=0)[None, :]) / tau
    ptrs = grad_row_ptr[None, :] + u * DP + cols
    tl.store(ptrs, dx.to(grad_row_ptr.dtype.element_ty), mask=row_mask[None, :] & (cols < DP))
    return index // DP


@triton.jit
def beam_topk_bwd_kernel(x_ptr, shift_ptr, index_ptr, weight_ptr, grad_w_ptr, grad_x_ptr, n_rows, stride_x, tau,
                   U: tl.constexpr, DP: tl.constexpr, DP_PAD: tl.constexpr, KB: tl.constexpr,
                   K_OUT: tl.constexpr, M: tl.constexpr, HAS_SHIFT: tl.constexpr, INDEX_64: tl.constexpr,
                   UNROLL: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    slots = tl.arange(0, KB)[:, None]
    out = rows[None, :] * K_OUT + slots
    out_mask = row_mask[None, :] & (slots < K_OUT)
    index = tl.load(index_ptr + out, mask=out_mask, other=0)
    if HAS_SHIFT:  # undo CAPE to recover each weight's per-partition entries: (m + s) mod M, s in [0, M)
        index = index + tl.load(shift_ptr + rows, mask=row_mask, other=0)[None, :]
        index = tl.where(index >= M, index - M, index)
    if not INDEX_64:
        index = index.to(tl.int32)
    # weight_k = exp(sum_u logp_u[m_{u,k}]): d weight_k / d logp_u[j] = weight_k [m_{u,k} == j].
    gw = tl.load(grad_w_ptr + out, mask=out_mask, other=0.0) * tl.load(weight_ptr + out, mask=out_mask, other=0.0)
    row_ptr, grad_row_ptr = x_ptr + rows * stride_x, grad_x_ptr + rows * stride_x
    if UNROLL:
        for i in tl.static_range(U):
            index = _partition_grad(row_ptr, grad_row_ptr, row_mask, tau, U - 1 - i, index, gw, DP, DP_PAD)
    else:
        for i in range(U):
            index = _partition_grad(row_ptr, grad_row_ptr, row_mask, tau, U - 1 - i, index, gw, DP, DP_PAD)
