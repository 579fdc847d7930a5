"""Triton kernels of segment-sorted PDMA (spec section 7), forward and backward.

Each (batch row, head) has a stream of 2K events per token, sorted by (sequence, slot) and in
time order inside each slot, writes of step t before its reads. Every event is one element of a
segmented linear recurrence ``h_e = a_e * h_{e-1} + b_e`` over ``h = [S, z]``: a write has
``a = (1 - w)^gamma`` and ``b = w [v, 1]``, a read ``a = 1, b = 0``; the first event of a slot's
segment folds the slot's initial content into ``b`` and gets ``a = 0``, which cuts the chain with
no flag to carry through the scans.

The stream of a row is cut into chunks (one program each) of blocks (one associative scan each):
pass 1 reduces every chunk to its aggregate, pass 2 carries the aggregates across the chunks of a
row, pass 3 rescans each chunk with its carry and emits the reads (and the final state). The
backward runs the adjoint recurrence ``G_e = d_e + a_{e+1} G_{e+1}`` right to left the same way,
recomputing the forward states from the per-block carries saved by pass 3. Nothing of size
[events, d_v] is stored; read outputs and value gradients go to [tokens, K, d_v] buffers summed
over K by the caller (deterministic, no atomics).
"""

import triton
import triton.language as tl


@triton.jit
def _fwd_combine(a1, b1, a2, b2):
    # Element 1 then element 2. A segment start has a = 0, which cuts the chain by itself.
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _bwd_combine(a1, b1, a2, b2):
    # Adjoints run right to left: element 1 (earlier) receives what element 2 (later) passes on.
    return a1 * a2, b1 + a1 * b2


@triton.jit
def _bwd_combine_reversed(a2, b2, a1, b1):
    # associative_scan(reverse=True) passes (accumulated later part, earlier element).
    return _bwd_combine(a1, b1, a2, b2)


@triton.jit
def _events(offs, row, E, T, D, perm_ptr, start_ptr, decay_ptr, write_w_ptr, v_ptr, h0_ptr, sidx_ptr, empty_z,
            K: tl.constexpr, DV: tl.constexpr, HAS_H0: tl.constexpr):
    """The events at sorted positions ``offs`` of ``row``: their recurrence inputs and origin.
    Positions outside [0, E) are identity elements (a = 1, b = 0, no reset)."""
    inside = (offs >= 0) & (offs < E)
    ev = row.to(tl.int64) * E + offs
    p = tl.load(perm_ptr + ev, mask=inside, other=0).to(tl.int64)
    t = p // (2 * K)
    lane = p % (2 * K)
    is_write = inside & (lane < K)
    is_read = inside & (lane >= K)
    tok = row.to(tl.int64) * T + t
    w_idx = tok * K + lane  # into [R, T, K] write arrays
    r_idx = w_idx - K  # into [R, T, K] read arrays
    a = tl.load(decay_ptr + w_idx, mask=is_write, other=1.0)
    w = tl.load(write_w_ptr + w_idx, mask=is_write, other=0.0)
    start = tl.load(start_ptr + ev, mask=inside, other=0) != 0
    a_rec = tl.where(start, 0.0, a)
    cols = tl.arange(0, DV)
    cmask = cols[None, :] < D
    v = tl.load(v_ptr + tok[:, None] * D + cols[None, :], mask=is_write[:, None] & cmask, other=0.0)
    if HAS_H0:
        si = tl.load(sidx_ptr + ev, mask=start, other=0)
        h0S = tl.load(h0_ptr + si[:, None] * (D + 1) + cols[None, :], mask=start[:, None] & cmask, other=0.0)
        h0z = tl.load(h0_ptr + si * (D + 1) + D, mask=start, other=0.0)
    else:  # the empty state: S = 0, z = empty_z
        h0S = tl.zeros_like(v)
        h0z = tl.where(start, empty_z, 0.0)
    bS = w[:, None] * v + a[:, None] * h0S
    bz = w + a * h0z
    return a, a_rec, bS, bz, start, tok, w_idx, r_idx, is_write, is_read, w, v, h0S, h0z


@triton.jit
def _scan_fwd(a, bS, bz, carryS, carryz, BLOCK: tl.constexpr, DV: tl.constexpr):
    """Inclusive states of a block given the state before it (``a`` is 0 at segment starts)."""
    AS, hS = tl.associative_scan((tl.broadcast_to(a[:, None], (BLOCK, DV)), bS), 0, _fwd_combine)
    Az, hz = tl.associative_scan((a, bz), 0, _fwd_combine)
    return hS + AS * carryS[None, :], hz + Az * carryz


@triton.jit
def _pick(xS, xz, i, BLOCK: tl.constexpr):
    """Row ``i`` of a block's [BLOCK, DV] S states and [BLOCK] z states (registers cannot be indexed)."""
    sel = tl.arange(0, BLOCK) == i
    return tl.sum(tl.where(sel[:, None], xS, 0.0), 0), tl.sum(tl.where(sel, xz, 0.0), 0)


@triton.jit
def _pick_scalar(x, i, BLOCK: tl.constexpr):
    return tl.sum(tl.where(tl.arange(0, BLOCK) == i, x, tl.zeros_like(x)), 0)


@triton.jit
def fwd_aggregate_kernel(perm_ptr, start_ptr, decay_ptr, write_w_ptr, v_ptr, h0_ptr, sidx_ptr, agg_ptr,
                         E, T, D, NC, empty_z,
                         K: tl.constexpr, DV: tl.constexpr, BLOCK: tl.constexpr, BLOCKS: tl.constexpr,
                         HAS_H0: tl.constexpr):
    """Pass 1: each chunk's aggregate (a, z, S) as if the state before it were zero."""
    row, c = tl.program_id(0), tl.program_id(1)
    A = 1.0
    BS = tl.zeros((DV,), tl.float32)
    Bz = 0.0
    for j in range(BLOCKS):
        offs = (c * BLOCKS + j) * BLOCK + tl.arange(0, BLOCK)
        _, a, bS, bz, _, _, _, _, _, _, _, _, _, _ = _events(
            offs, row, E, T, D, perm_ptr, start_ptr, decay_ptr, write_w_ptr, v_ptr, h0_ptr, sidx_ptr, empty_z,
            K, DV, HAS_H0)
        # The block's aggregate is the last element of its inclusive scan (tl.reduce would need
        # a commutative combine: on the GPU it combines lanes out of order).
        _, rS = tl.associative_scan((tl.broadcast_to(a[:, None], (BLOCK, DV)), bS), 0, _fwd_combine)
        ra, rz = tl.associative_scan((a, bz), 0, _fwd_combine)
        rS, rz = _pick(rS, rz, BLOCK - 1, BLOCK)
        ra = _pick_scalar(ra, BLOCK - 1, BLOCK)
        BS = ra * BS + rS
        Bz = ra * Bz + rz
        A = A * ra
    _store_aggregate(agg_ptr, row * NC + c, A, BS, Bz, D, DV)


@triton.jit
def _store_aggregate(agg_ptr, i, A, BS, Bz, D, DV: tl.constexpr):
    # An aggregate row is [a, z, S_0 .. S_{D-1}].
    base = agg_ptr + i.to(tl.int64) * (D + 2)
    cols = tl.arange(0, DV)
    tl.store(base, A)
    tl.store(base + 1, Bz)
    tl.store(base + 2 + cols, BS, mask=cols < D)


@triton.jit
def _load_aggregate(agg_ptr, i, D, DV: tl.constexpr):
    base = agg_ptr + i * (D + 2)
    cols = tl.arange(0, DV)
    return tl.load(base), tl.load(base + 1), tl.load(base + 2 + cols, mask=cols < D, other=0.0)


@triton.jit
def carry_kernel(agg_ptr, carry_ptr, NC, D, DV: tl.constexpr, REVERSE: tl.constexpr):
    """Pass 2: what enters each chunk of a row, [z, S] per chunk: the state from the left, or
    (``REVERSE``) the adjoint from the right. Both fold the aggregates as ``c <- A c + B``."""
    row = tl.program_id(0)
    cS = tl.zeros((DV,), tl.float32)
    cz = 0.0
    for j in range(NC):
        i = row.to(tl.int64) * NC + (NC - 1 - j if REVERSE else j)
        _store_carry(carry_ptr, i, cS, cz, D, DV)
        A, Bz, BS = _load_aggregate(agg_ptr, i, D, DV)
        cS = A * cS + BS
        cz = A * cz + Bz


@triton.jit
def _load_carry(carry_ptr, i, D, DV: tl.constexpr):
    cols = tl.arange(0, DV)
    base = carry_ptr + i.to(tl.int64) * (D + 1)
    return tl.load(base + 1 + cols, mask=cols < D, other=0.0), tl.load(base)


@triton.jit
def _store_carry(carry_ptr, i, cS, cz, D, DV: tl.constexpr):
    cols = tl.arange(0, DV)
    base = carry_ptr + i.to(tl.int64) * (D + 1)
    tl.store(base, cz)
    tl.store(base + 1 + cols, cS, mask=cols < D)


@triton.jit
def _segment_ends(offs, row, E, start_ptr, sidx_ptr):
    """Which events end their slot's segment (the next one starts another, or the row ends), and
    their slot's state row."""
    nxt = offs + 1
    ends = (offs < E) & ((nxt >= E) | (tl.load(start_ptr + row.to(tl.int64) * E + nxt, mask=nxt < E, other=1) != 0))
    return ends, tl.load(sidx_ptr + row.to(tl.int64) * E + offs, mask=ends, other=0)


@triton.jit
def fwd_output_kernel(perm_ptr, start_ptr, decay_ptr, write_w_ptr, read_w_ptr, v_ptr, h0_ptr, sidx_ptr,
                      chunk_carry_ptr, block_carry_ptr, out_ptr, final_ptr,
                      E, T, D, NC, empty_z, eps,
                      K: tl.constexpr, DV: tl.constexpr, BLOCK: tl.constexpr, BLOCKS: tl.constexpr,
                      HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr):
    """Pass 3: rescan each chunk from its carry; emit r * S / (z + eps) for every read into
    ``out [R*T*K, D]``, the state before every block, and the final state of every segment."""
    row, c = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, DV)
    cmask = cols[None, :] < D
    cS, cz = _load_carry(chunk_carry_ptr, row * NC + c, D, DV)
    for j in range(BLOCKS):
        blk = c * BLOCKS + j
        _store_carry(block_carry_ptr, row * NC * BLOCKS + blk, cS, cz, D, DV)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        _, a, bS, bz, _, tok, w_idx, r_idx, is_write, is_read, _, _, _, _ = _events(
            offs, row, E, T, D, perm_ptr, start_ptr, decay_ptr, write_w_ptr, v_ptr, h0_ptr, sidx_ptr, empty_z,
            K, DV, HAS_H0)
        hS, hz = _scan_fwd(a, bS, bz, cS, cz, BLOCK, DV)
        r = tl.load(read_w_ptr + r_idx, mask=is_read, other=0.0)
        coef = r / (hz + eps)
        tl.store(out_ptr + r_idx[:, None] * D + cols[None, :], coef[:, None] * hS, mask=is_read[:, None] & cmask)
        if STORE_FINAL:  # the last event of a segment holds the slot's final content
            ends, si = _segment_ends(offs, row, E, start_ptr, sidx_ptr)
            tl.store(final_ptr + si[:, None] * (D + 1) + cols[None, :], hS, mask=ends[:, None] & cmask)
            tl.store(final_ptr + si * (D + 1) + D, hz, mask=ends)
        cS, cz = _pick(hS, hz, BLOCK - 1, BLOCK)


@triton.jit
def _next_events(offs, row, E, T, perm_ptr, start_ptr, decay_ptr, K: tl.constexpr):
    """For the adjoint recurrence: the decay of the next event, 0 where the chain is cut after
    this one (the next event starts a segment, or this is the row's last event)."""
    nxt = offs + 1
    inside = nxt < E
    ev = row.to(tl.int64) * E + nxt
    p = tl.load(perm_ptr + ev, mask=inside, other=0).to(tl.int64)
    lane = p % (2 * K)
    is_write = inside & (lane < K)
    a_next = tl.load(decay_ptr + (row.to(tl.int64) * T + p // (2 * K)) * K + lane, mask=is_write, other=1.0)
    cut = (~inside) | (tl.load(start_ptr + ev, mask=inside, other=1) != 0)
    return tl.where(cut, 0.0, a_next)


@triton.jit
def _direct_adjoint(hS, hz, tok, r_idx, is_read, offs, row, E, start_ptr, sidx_ptr, grad_o_ptr, grad_final_ptr,
                    read_w_ptr, eps, D, DV: tl.constexpr, HAS_GRAD_FINAL: tl.constexpr):
    """dL/dh_e from the event itself: its read's output, and the final-state gradient at the
    last event of a segment. Also returns dL/dr of reads."""
    cols = tl.arange(0, DV)
    cmask = cols[None, :] < D
    do = tl.load(grad_o_ptr + tok[:, None] * D + cols[None, :], mask=is_read[:, None] & cmask, other=0.0)
    r = tl.load(read_w_ptr + r_idx, mask=is_read, other=0.0)
    inv = tl.where(is_read, 1.0 / (hz + eps), 0.0)
    dot = tl.sum(do * hS, 1) * inv
    dS = (r * inv)[:, None] * do
    dz = -r * dot * inv
    if HAS_GRAD_FINAL:
        ends, si = _segment_ends(offs, row, E, start_ptr, sidx_ptr)
        dS += tl.load(grad_final_ptr + si[:, None] * (D + 1) + cols[None, :], mask=ends[:, None] & cmask, other=0.0)
        dz += tl.load(grad_final_ptr + si * (D + 1) + D, mask=ends, other=0.0)
    return dS, dz, dot


@triton.jit
def bwd_aggregate_kernel(perm_ptr, start_ptr, decay_ptr, write_w_ptr, read_w_ptr, v_ptr, h0_ptr, sidx_ptr,
                         block_carry_ptr, grad_o_ptr, grad_final_ptr, agg_ptr,
                         E, T, D, NC, empty_z, eps,
                         K: tl.constexpr, DV: tl.constexpr, BLOCK: tl.constexpr, BLOCKS: tl.constexpr,
                         HAS_H0: tl.constexpr, HAS_GRAD_FINAL: tl.constexpr):
    """Backward pass 1: each chunk's adjoint aggregate, as if nothing came from its right."""
    row, c = tl.program_id(0), tl.program_id(1)
    A = 1.0
    BS = tl.zeros((DV,), tl.float32)
    Bz = 0.0
    for jj in range(BLOCKS):
        blk = c * BLOCKS + (BLOCKS - 1 - jj)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        _, a, bS, bz, _, tok, _, r_idx, _, is_read, _, _, _, _ = _events(
            offs, row, E, T, D, perm_ptr, start_ptr, decay_ptr, write_w_ptr, v_ptr, h0_ptr, sidx_ptr, empty_z,
            K, DV, HAS_H0)
        cS, cz = _load_carry(block_carry_ptr, row * NC * BLOCKS + blk, D, DV)
        hS, hz = _scan_fwd(a, bS, bz, cS, cz, BLOCK, DV)
        dS, dz, _ = _direct_adjoint(hS, hz, tok, r_idx, is_read, offs, row, E, start_ptr, sidx_ptr, grad_o_ptr,
                                    grad_final_ptr, read_w_ptr, eps, D, DV, HAS_GRAD_FINAL)
        alpha = _next_events(offs, row, E, T, perm_ptr, start_ptr, decay_ptr, K)
        _, rS = tl.associative_scan((tl.broadcast_to(alpha[:, None], (BLOCK, DV)), dS), 0, _bwd_combine)
        ra, rz = tl.associative_scan((alpha, dz), 0, _bwd_combine)
        rS, rz = _pick(rS, rz, BLOCK - 1, BLOCK)
        ra = _pick_scalar(ra, BLOCK - 1, BLOCK)
        # this block is earlier than what was folded so far
        BS = rS + ra * BS
        Bz = rz + ra * Bz
        A = ra * A
    _store_aggregate(agg_ptr, row * NC + c, A, BS, Bz, D, DV)


@triton.jit
def bwd_output_kernel(perm_ptr, start_ptr, decay_ptr, write_w_ptr, read_w_ptr, v_ptr, h0_ptr, sidx_ptr,
                      block_carry_ptr, chunk_grad_carry_ptr, grad_o_ptr, grad_final_ptr,
                      grad_decay_ptr, grad_write_w_ptr, grad_read_w_ptr, grad_v_ptr, grad_h0_ptr,
                      E, T, D, NC, empty_z, eps,
                      K: tl.constexpr, DV: tl.constexpr, BLOCK: tl.constexpr, BLOCKS: tl.constexpr,
                      HAS_H0: tl.constexpr, HAS_GRAD_FINAL: tl.constexpr):
    """Backward pass 3: adjoints G_e of every event from the carried ones, then the gradients
    of every write (decay, weight, value into ``grad_v [R*T*K, D]``), read weight and initial slot."""
    row, c = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, DV)
    cmask = cols[None, :] < D
    idx = tl.arange(0, BLOCK)
    gS, gz = _load_carry(chunk_grad_carry_ptr, row * NC + c, D, DV)
    for jj in range(BLOCKS):
        blk = c * BLOCKS + (BLOCKS - 1 - jj)
        offs = blk * BLOCK + idx
        a, a_rec, bS, bz, start, tok, w_idx, r_idx, is_write, is_read, w, v, h0S, h0z = _events(
            offs, row, E, T, D, perm_ptr, start_ptr, decay_ptr, write_w_ptr, v_ptr, h0_ptr, sidx_ptr, empty_z,
            K, DV, HAS_H0)
        cS, cz = _load_carry(block_carry_ptr, row * NC * BLOCKS + blk, D, DV)
        hS, hz = _scan_fwd(a_rec, bS, bz, cS, cz, BLOCK, DV)
        # The state before each event: the same scan over the events shifted by one, the first
        # replaced by the identity so that it yields the carry.
        _, pa, pS, pz, _, _, _, _, _, _, _, _, _, _ = _events(
            offs - 1, row, E, T, D, perm_ptr, start_ptr, decay_ptr, write_w_ptr, v_ptr, h0_ptr, sidx_ptr, empty_z,
            K, DV, HAS_H0)
        first = idx == 0
        pa = tl.where(first, 1.0, pa)
        pS = tl.where(first[:, None], 0.0, pS)
        pz = tl.where(first, 0.0, pz)
        prevS, prevz = _scan_fwd(pa, pS, pz, cS, cz, BLOCK, DV)
        prevS = tl.where(start[:, None], h0S, prevS)
        prevz = tl.where(start, h0z, prevz)

        dS, dz, dot = _direct_adjoint(hS, hz, tok, r_idx, is_read, offs, row, E, start_ptr, sidx_ptr, grad_o_ptr,
                                      grad_final_ptr, read_w_ptr, eps, D, DV, HAS_GRAD_FINAL)
        alpha = _next_events(offs, row, E, T, perm_ptr, start_ptr, decay_ptr, K)
        GA, GS = tl.associative_scan((tl.broadcast_to(alpha[:, None], (BLOCK, DV)), dS), 0, _bwd_combine_reversed,
                                     reverse=True)
        Ga, Gz = tl.associative_scan((alpha, dz), 0, _bwd_combine_reversed, reverse=True)
        GS = GS + GA * gS[None, :]
        Gz = Gz + Ga * gz

        tl.store(grad_read_w_ptr + r_idx, dot, mask=is_read)
        tl.store(grad_write_w_ptr + w_idx, tl.sum(GS * v, 1) + Gz, mask=is_write)
        tl.store(grad_decay_ptr + w_idx, tl.sum(GS * prevS, 1) + Gz * prevz, mask=is_write)
        tl.store(grad_v_ptr + w_idx[:, None] * D + cols[None, :], w[:, None] * GS, mask=is_write[:, None] & cmask)
        if HAS_H0:
            si = tl.load(sidx_ptr + row.to(tl.int64) * E + offs, mask=start, other=0)
            tl.store(grad_h0_ptr + si[:, None] * (D + 1) + cols[None, :], a[:, None] * GS,
                     mask=start[:, None] & cmask)
            tl.store(grad_h0_ptr + si * (D + 1) + D, a * Gz, mask=start)
        gS, gz = _pick(GS, Gz, 0, BLOCK)
