"""Jit code of segment-sorted PDMA (launched by ``triton.py`` beside it): kernels that walk the events
one at a time (docs/kernels.md).

The recurrence and event stream are the parallel path's (a row's 2K events per token sorted by
(sequence, slot), ``h_e = a_e h_{e-1} + b_e`` over ``h = [S, z]``, ``a = 0`` at a segment start,
whose ``b`` folds in the slot's initial content). Layout: a program owns a chunk of consecutive
events and its threads own the d_v channels. The scan along the events is then a
plain loop, one FMA per event and channel, with no cross-thread traffic; the loop body is unrolled
over groups of ``G`` events so that their loads are in flight together.

Passes, forward: (1) each chunk's aggregate, walking only its last segment (the state before a
segment start does not matter); (2) the carries across the chunks of a row, ``G_CARRY`` chunks at
a time; (3) every event again from its chunk's carry, emitting the reads, the state before every
group (saved for the backward) and the final state. Backward: (1) each chunk's adjoint aggregate,
walking only its first segment forward (the adjoint that leaves a chunk to the left comes from
it alone, as a sum of the direct adjoints weighted by decay products); (2) the carries from the
right; (3) per group, from the saved state before it: a forward walk that records the state
before every event in registers, then a reverse walk that runs the adjoint and emits the
gradients.

Tensors are read in their token layout ``[B, T, H, ...]`` (no per-row copies); a row is one
(batch row, head). Reads and value gradients go to ``[B, T, H, K, d_v]`` buffers that the caller
sums over K (deterministic, no atomics).
"""

import triton
import triton.language as tl


# Sizes that only enter address arithmetic: not specialised (Triton would otherwise compile a kernel
# per value class of each, e.g. divisible by 16 or not, so every new sequence length recompiled).
# D stays specialised: its divisibility lets the loads of d_v-wide rows vectorise.
SHAPE_ARGS = ["E", "T", "H", "NC"]


@triton.jit
def _fwd_combine(a1, b1, a2, b2):
    # Element 1 then element 2. A segment start has a = 0, which cuts the chain by itself.
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _event(e, bound, row, E, T, H, D, perm_ptr, start_ptr, decay_ptr, write_w_ptr, read_w_ptr, v_ptr, h0_ptr,
           sidx_ptr, empty_z, K: tl.constexpr, DV: tl.constexpr, HAS_H0: tl.constexpr):
    """Event ``e`` of ``row`` (an identity element when ``e >= bound``): its position in the sorted
    stream, segment-start flag, index into [B, T, H, K] arrays, kind, decay, weights, value and,
    at a segment start, the slot's initial [S, z] (zeros elsewhere).

    Channel masks are written ``where(flag, cols < D, False)``: Triton's interpreter turns
    ``scalar & vector`` into int32."""
    inside = e < bound
    ev = row.to(tl.int64) * E + e
    p = tl.load(perm_ptr + ev, mask=inside, other=0)
    start = inside & (tl.load(start_ptr + ev, mask=inside, other=0) != 0)
    t = (p // (2 * K)).to(tl.int64)
    lane = p % (2 * K)
    is_write = inside & (lane < K)
    is_read = inside & (lane >= K)
    tok = ((row // H).to(tl.int64) * T + t) * H + row % H  # token-head index into [B, T, H, ...]
    w_idx = tok * K + lane  # write lanes index [B, T, H, K]; read lanes minus K
    a = tl.load(decay_ptr + w_idx, mask=is_write, other=1.0)
    w = tl.load(write_w_ptr + w_idx, mask=is_write, other=0.0)
    r = tl.load(read_w_ptr + w_idx - K, mask=is_read, other=0.0)
    cols = tl.arange(0, DV)
    v = tl.load(v_ptr + tok * D + cols, mask=tl.where(is_write, cols < D, False), other=0.0).to(tl.float32)
    if HAS_H0:
        si = tl.load(sidx_ptr + ev, mask=start, other=0).to(tl.int64)
        h0S = tl.load(h0_ptr + si * (D + 1) + cols, mask=tl.where(start, cols < D, False), other=0.0)
        h0z = tl.load(h0_ptr + si * (D + 1) + D, mask=start, other=0.0)
    else:  # the empty state: S = 0, z = empty_z
        h0S = tl.zeros((DV,), tl.float32)
        h0z = tl.where(start, empty_z, 0.0)
    return ev, start, tok, w_idx, is_write, is_read, a, w, r, v, h0S, h0z


@triton.jit
def _step(hS, hz, start, a, w, v, h0S, h0z):
    """One event of the recurrence: ``h <- a h + w [v, 1]``, or ``a h0 + w [v, 1]`` at a segment
    start. Also returns the decay the chain carries (0 at a start)."""
    a_rec = tl.where(start, 0.0, a)
    return a_rec * hS + w * v + a * h0S, a_rec * hz + w + a * h0z, a_rec


@triton.jit
def _segment_end(e, row, E, start_ptr, sidx_ptr, inside):
    """Whether event ``e`` ends its slot's segment in the row, and that slot's state row."""
    nxt = e + 1
    ev = row.to(tl.int64) * E + e
    end = inside & ((nxt >= E) | (tl.load(start_ptr + ev + 1, mask=nxt < E, other=1) != 0))
    return end, tl.load(sidx_ptr + ev, mask=end, other=0).to(tl.int64)


@triton.jit
def _direct_adjoint(hS, hz, e, inside, row, tok, is_read, r, E, start_ptr, sidx_ptr, grad_o_ptr, grad_final_ptr,
                    eps, D, DV: tl.constexpr, HAS_GRAD_FINAL: tl.constexpr):
    """dL/dh_e from the event itself (its read, and the final-state gradient at a segment's last
    event) and dL/dr of a read; ``inside``: whether ``e`` is a real event of the walk."""
    cols = tl.arange(0, DV)
    do = tl.load(grad_o_ptr + tok * D + cols, mask=tl.where(is_read, cols < D, False), other=0.0).to(tl.float32)
    inv = tl.where(is_read, 1.0 / (hz + eps), 0.0)
    dot = tl.sum(do * hS, 0) * inv
    dS = (r * inv) * do
    dz = -r * dot * inv
    if HAS_GRAD_FINAL:
        end, si = _segment_end(e, row, E, start_ptr, sidx_ptr, inside)
        dS += tl.load(grad_final_ptr + si * (D + 1) + cols, mask=tl.where(end, cols < D, False), other=0.0)
        dz += tl.load(grad_final_ptr + si * (D + 1) + D, mask=end, other=0.0)
    return dS, dz, dot


@triton.jit
def _store_row(ptr, i, first, rest, D, DV: tl.constexpr):
    """Row ``i`` of a [n, D + 1] (or [n, D + 2]) table: ``first`` then the vector ``rest``."""
    cols = tl.arange(0, DV)
    tl.store(ptr + i, first)
    tl.store(ptr + i + 1 + cols, rest, mask=cols < D)


@triton.jit
def _load_row(ptr, i, D, DV: tl.constexpr):
    """The (scalar, vector) pair that ``_store_row`` wrote at ``i``."""
    cols = tl.arange(0, DV)
    return tl.load(ptr + i), tl.load(ptr + i + 1 + cols, mask=cols < D, other=0.0)


@triton.jit
def _group_row(row, NC, g, D, CH: tl.constexpr, G: tl.constexpr):
    """Offset of the saved [z, S] state before the group of events starting at ``g``."""
    return (row * NC * (CH // G) + g // G).to(tl.int64) * (D + 1)


@triton.jit
def _chunk(c, E, CH: tl.constexpr):
    lo = c * CH
    return lo, tl.minimum(lo + CH, E)


@triton.jit
def _find_start(row, lo, hi, E, start_ptr, LAST: tl.constexpr):
    """The last segment start in [lo, hi) (``lo`` if none), or (``LAST`` False) the first one
    in (lo, hi) (``hi`` if none)."""
    found = lo if LAST else hi
    for s in range(lo, hi, 256):
        offs = s + tl.arange(0, 256)
        ok = (offs < hi) if LAST else ((offs > lo) & (offs < hi))
        st = ok & (tl.load(start_ptr + row.to(tl.int64) * E + offs, mask=ok, other=0) != 0)
        if LAST:
            found = tl.maximum(found, tl.max(tl.where(st, offs, lo), 0))
        else:
            found = tl.minimum(found, tl.min(tl.where(st, offs, hi), 0))
    return found


@triton.jit(do_not_specialize=SHAPE_ARGS)
def fwd_aggregate_kernel(perm_ptr, start_ptr, decay_ptr, write_w_ptr, read_w_ptr, v_ptr, h0_ptr, sidx_ptr, agg_ptr,
                         E, T, H, D, NC, empty_z,
                         K: tl.constexpr, DV: tl.constexpr, CH: tl.constexpr, G: tl.constexpr,
                         HAS_H0: tl.constexpr):
    """Pass 1: each chunk's aggregate [A, z, S]: the state at its end from a zero state before it,
    and A the product of its decays (0 when it holds a segment start)."""
    row, c = tl.program_id(0), tl.program_id(1)
    lo, hi = _chunk(c, E, CH)
    A = 1.0
    hS = tl.zeros((DV,), tl.float32)
    hz = 0.0
    for g in range(_find_start(row, lo, hi, E, start_ptr, True), hi, G):
        for j in tl.static_range(G):
            ev, start, _, _, _, _, a, w, _, v, h0S, h0z = _event(
                g + j, hi, row, E, T, H, D, perm_ptr, start_ptr, decay_ptr, write_w_ptr, read_w_ptr,
                v_ptr, h0_ptr, sidx_ptr, empty_z, K, DV, HAS_H0)
            hS, hz, a_rec = _step(hS, hz, start, a, w, v, h0S, h0z)
            A = A * a_rec
    base = (row * NC + c).to(tl.int64) * (D + 2)
    tl.store(agg_ptr + base, A)
    _store_row(agg_ptr, base + 1, hz, hS, D, DV)


@triton.jit
def _chunk_row(row, NC, q, REVERSE: tl.constexpr):
    """Index of the chunk processed ``q``-th in a row: left to right, or right to left."""
    return row.to(tl.int64) * NC + ((NC - 1 - q) if REVERSE else q)


@triton.jit(do_not_specialize=["NC"])
def carry_kernel(agg_ptr, carry_ptr, NC, D, DV: tl.constexpr, REVERSE: tl.constexpr, G_CARRY: tl.constexpr):
    """Pass 2: what enters each chunk of a row as [z, S]: the state from the left or (``REVERSE``)
    the adjoint from the right, both folds of the aggregates ``c <- A c + B``. ``G_CARRY`` chunks
    at a time are composed by one associative scan over the aggregates shifted by one (the first
    replaced by the identity), which gives what enters each of them; the loop is ``NC / G_CARRY``
    steps long."""
    row = tl.program_id(0)
    idx = tl.arange(0, G_CARRY)
    cols = tl.arange(0, DV)
    cmask = cols[None, :] < D
    cS = tl.zeros((DV,), tl.float32)
    cz = 0.0
    for s in range(0, NC, G_CARRY):
        q = s + idx
        prev = (q >= 1) & (idx >= 1) & (q - 1 < NC)
        i = _chunk_row(row, NC, q - 1, REVERSE)
        A = tl.load(agg_ptr + i * (D + 2), mask=prev, other=1.0)
        Bz = tl.load(agg_ptr + i * (D + 2) + 1, mask=prev, other=0.0)
        BS = tl.load(agg_ptr + i[:, None] * (D + 2) + 2 + cols[None, :], mask=prev[:, None] & cmask, other=0.0)
        AS, PS = tl.associative_scan((tl.broadcast_to(A[:, None], (G_CARRY, DV)), BS), 0, _fwd_combine)
        Az, Pz = tl.associative_scan((A, Bz), 0, _fwd_combine)
        enterS = PS + AS * cS[None, :]
        enterz = Pz + Az * cz
        ok = q < NC
        o = _chunk_row(row, NC, q, REVERSE)
        tl.store(carry_ptr + o * (D + 1), enterz, mask=ok)
        tl.store(carry_ptr + o[:, None] * (D + 1) + 1 + cols[None, :], enterS, mask=ok[:, None] & cmask)
        # What leaves the group: its last chunk's map applied to what enters that chunk.
        last = idx == G_CARRY - 1
        j = _chunk_row(row, NC, s + G_CARRY - 1, REVERSE)
        more = s + G_CARRY - 1 < NC
        lA = tl.load(agg_ptr + j * (D + 2), mask=more, other=1.0)
        lz = tl.load(agg_ptr + j * (D + 2) + 1, mask=more, other=0.0)
        lS = tl.load(agg_ptr + j * (D + 2) + 2 + cols, mask=tl.where(more, cols < D, False), other=0.0)
        cS = lA * tl.sum(tl.where(last[:, None], enterS, 0.0), 0) + lS
        cz = lA * tl.sum(tl.where(last, enterz, 0.0), 0) + lz


@triton.jit
def _keep(rows, idx, ok, here, row, i, flag):
    """Record an event's output ``row``, its destination ``i`` and whether to store it (``flag``)
    in the group's registers, at the entry ``here`` selects (flags as int32: the interpreter
    cannot mix scalar and vector booleans). The stores wait until the group's
    walk is done: the compiler may not move a load past a store that could alias it, so a store
    per event would serialise the events' loads."""
    return tl.where(here[:, None], row[None, :], rows), tl.where(here, i, idx), tl.where(here, flag.to(tl.int32), ok)


@triton.jit
def _flush(ptr, rows, idx, ok, width, D, DV: tl.constexpr):
    """Store the kept rows at ``ptr + idx * width`` (first D columns)."""
    cols = tl.arange(0, DV)
    tl.store(ptr + idx[:, None] * width + cols[None, :], rows, mask=(ok[:, None] != 0) & (cols[None, :] < D))


@triton.jit(do_not_specialize=SHAPE_ARGS)
def fwd_output_kernel(perm_ptr, start_ptr, decay_ptr, write_w_ptr, read_w_ptr, v_ptr, h0_ptr, sidx_ptr,
                      carry_ptr, group_state_ptr, out_ptr, final_ptr,
                      E, T, H, D, NC, empty_z, eps,
                      K: tl.constexpr, DV: tl.constexpr, CH: tl.constexpr, G: tl.constexpr,
                      HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr):
    """Pass 3: every event of the chunk from its carry. Emits ``r S / (z + eps)`` of every read
    into ``out [B, T, H, K, D]``, the state [z, S] before every group of G events and the final
    state of every segment."""
    row, c = tl.program_id(0), tl.program_id(1)
    lo, hi = _chunk(c, E, CH)
    gi = tl.arange(0, G)
    hz, hS = _load_row(carry_ptr, (row * NC + c).to(tl.int64) * (D + 1), D, DV)
    for g in range(lo, hi, G):
        _store_row(group_state_ptr, _group_row(row, NC, g, D, CH, G), hz, hS, D, DV)
        out_rows = tl.zeros((G, DV), tl.float32)
        out_idx = tl.zeros((G,), tl.int64)
        out_ok = tl.zeros((G,), tl.int32)
        if STORE_FINAL:
            fin_rows = tl.zeros((G, DV), tl.float32)
            fin_z = tl.zeros((G,), tl.float32)
            fin_idx = tl.zeros((G,), tl.int64)
            fin_ok = tl.zeros((G,), tl.int32)
        for j in tl.static_range(G):
            ev, start, tok, w_idx, _, is_read, a, w, r, v, h0S, h0z = _event(
                g + j, hi, row, E, T, H, D, perm_ptr, start_ptr, decay_ptr, write_w_ptr, read_w_ptr,
                v_ptr, h0_ptr, sidx_ptr, empty_z, K, DV, HAS_H0)
            hS, hz, a_rec = _step(hS, hz, start, a, w, v, h0S, h0z)
            here = gi == j
            out_rows, out_idx, out_ok = _keep(out_rows, out_idx, out_ok, here, (r / (hz + eps)) * hS, w_idx - K,
                                              is_read)
            if STORE_FINAL:  # the last event of a segment holds the slot's final content
                end, si = _segment_end(g + j, row, E, start_ptr, sidx_ptr, g + j < hi)
                fin_rows, fin_idx, fin_ok = _keep(fin_rows, fin_idx, fin_ok, here, hS, si, end)
                fin_z = tl.where(here, hz, fin_z)
        _flush(out_ptr, out_rows, out_idx, out_ok, D, D, DV)
        if STORE_FINAL:
            _flush(final_ptr, fin_rows, fin_idx, fin_ok, D + 1, D, DV)
            tl.store(final_ptr + fin_idx * (D + 1) + D, fin_z, mask=fin_ok != 0)


@triton.jit(do_not_specialize=SHAPE_ARGS)
def bwd_aggregate_kernel(perm_ptr, start_ptr, decay_ptr, write_w_ptr, read_w_ptr, v_ptr, h0_ptr, sidx_ptr,
                         group_state_ptr, grad_o_ptr, grad_final_ptr, agg_ptr,
                         E, T, H, D, NC, empty_z, eps,
                         K: tl.constexpr, DV: tl.constexpr, CH: tl.constexpr, G: tl.constexpr,
                         HAS_H0: tl.constexpr, HAS_GRAD_FINAL: tl.constexpr):
    """Backward pass 1: each chunk's adjoint aggregate [A, z, S]. What the chunk passes to its
    left neighbour is ``a_lo G_lo``, and ``G_lo = sum_i P_i d_i + A' G_in`` over the chunk's first
    segment, with ``P_i`` the decays after ``lo`` up to ``i``: one forward walk of that segment
    (it needs the forward states for the read adjoints ``d_i``)."""
    row, c = tl.program_id(0), tl.program_id(1)
    lo, hi = _chunk(c, E, CH)
    stop = _find_start(row, lo, hi, E, start_ptr, False)
    hz, hS = _load_row(group_state_ptr, _group_row(row, NC, lo, D, CH, G), D, DV)
    P = 1.0
    a_lo = 0.0
    accS = tl.zeros((DV,), tl.float32)
    accz = 0.0
    for g in range(lo, stop, G):
        for j in tl.static_range(G):
            e = g + j
            ev, start, tok, _, _, is_read, a, w, r, v, h0S, h0z = _event(
                e, stop, row, E, T, H, D, perm_ptr, start_ptr, decay_ptr, write_w_ptr, read_w_ptr,
                v_ptr, h0_ptr, sidx_ptr, empty_z, K, DV, HAS_H0)
            hS, hz, a_rec = _step(hS, hz, start, a, w, v, h0S, h0z)
            is_lo = e == lo
            a_lo = tl.where(is_lo, a_rec, a_lo)
            P = tl.where(is_lo, 1.0, P * a_rec)
            dS, dz, _ = _direct_adjoint(hS, hz, e, e < stop, row, tok, is_read, r, E, start_ptr, sidx_ptr, grad_o_ptr,
                                        grad_final_ptr, eps, D, DV, HAS_GRAD_FINAL)
            accS += P * dS
            accz += P * dz
    A = tl.where(stop == hi, a_lo * P, 0.0)  # a segment start inside the chunk stops the adjoint
    out = (row * NC + c).to(tl.int64) * (D + 2)
    tl.store(agg_ptr + out, A)
    _store_row(agg_ptr, out + 1, a_lo * accz, a_lo * accS, D, DV)


@triton.jit(do_not_specialize=SHAPE_ARGS)
def bwd_output_kernel(perm_ptr, start_ptr, decay_ptr, write_w_ptr, read_w_ptr, v_ptr, h0_ptr, sidx_ptr,
                      group_state_ptr, grad_carry_ptr, grad_o_ptr, grad_final_ptr,
                      grad_decay_ptr, grad_write_w_ptr, grad_read_w_ptr, grad_v_ptr, grad_h0_ptr,
                      E, T, H, D, NC, empty_z, eps,
                      K: tl.constexpr, DV: tl.constexpr, CH: tl.constexpr, G: tl.constexpr,
                      HAS_H0: tl.constexpr, HAS_GRAD_FINAL: tl.constexpr):
    """Backward pass 3: the chunk's groups right to left. Per group, a forward walk from the saved
    state records in registers the state before each event (``h0`` at a segment start, where
    dh/da = h0) and each event's direct adjoint; a reverse walk then runs ``G_e = d_e + a_{e+1}
    G_{e+1}`` and keeps the gradients of every write (decay, weight, value into ``grad_v
    [B, T, H, K, D]``), read weight and initial slot, stored once per group."""
    row, c = tl.program_id(0), tl.program_id(1)
    lo, hi = _chunk(c, E, CH)
    gi = tl.arange(0, G)
    none = tl.zeros((G,), tl.int32)
    gz, gS = _load_row(grad_carry_ptr, (row * NC + c).to(tl.int64) * (D + 1), D, DV)
    groups = tl.cdiv(hi - lo, G)
    for jj in range(groups):
        g = lo + (groups - 1 - jj) * G
        hz, hS = _load_row(group_state_ptr, _group_row(row, NC, g, D, CH, G), D, DV)
        prevS = tl.zeros((G, DV), tl.float32)
        dS_all = tl.zeros((G, DV), tl.float32)
        prevz = tl.zeros((G,), tl.float32)
        dz_all = tl.zeros((G,), tl.float32)
        dot_all = tl.zeros((G,), tl.float32)
        read_idx = tl.zeros((G,), tl.int64)
        read_ok = none
        for j in tl.static_range(G):
            ev, start, tok, w_idx, _, is_read, a, w, r, v, h0S, h0z = _event(
                g + j, hi, row, E, T, H, D, perm_ptr, start_ptr, decay_ptr, write_w_ptr, read_w_ptr,
                v_ptr, h0_ptr, sidx_ptr, empty_z, K, DV, HAS_H0)
            here = gi == j
            prevS = tl.where(here[:, None], tl.where(start, h0S, hS)[None, :], prevS)
            prevz = tl.where(here, tl.where(start, h0z, hz), prevz)
            hS, hz, a_rec = _step(hS, hz, start, a, w, v, h0S, h0z)
            dS, dz, dot = _direct_adjoint(hS, hz, g + j, g + j < hi, row, tok, is_read, r, E, start_ptr, sidx_ptr,
                                          grad_o_ptr, grad_final_ptr, eps, D, DV, HAS_GRAD_FINAL)
            dS_all = tl.where(here[:, None], dS[None, :], dS_all)
            dz_all = tl.where(here, dz, dz_all)
            dot_all = tl.where(here, dot, dot_all)
            read_idx = tl.where(here, w_idx - K, read_idx)
            read_ok = tl.where(here, is_read.to(tl.int32), read_ok)
        tl.store(grad_read_w_ptr + read_idx, dot_all, mask=read_ok != 0)

        gv_rows = tl.zeros((G, DV), tl.float32)
        gw = tl.zeros((G,), tl.float32)
        ga = tl.zeros((G,), tl.float32)
        write_idx = tl.zeros((G,), tl.int64)
        write_ok = none
        h0_rows = tl.zeros((G, DV), tl.float32)
        h0_z = tl.zeros((G,), tl.float32)
        h0_idx = tl.zeros((G,), tl.int64)
        h0_ok = none
        for jr in tl.static_range(G):
            j = G - 1 - jr
            ev, start, _, w_idx, is_write, _, a, w, _, v, _, _ = _event(
                g + j, hi, row, E, T, H, D, perm_ptr, start_ptr, decay_ptr, write_w_ptr, read_w_ptr,
                v_ptr, h0_ptr, sidx_ptr, empty_z, K, DV, False)
            here = gi == j
            GS = tl.sum(tl.where(here[:, None], dS_all, 0.0), 0) + gS
            Gz = tl.sum(tl.where(here, dz_all, 0.0), 0) + gz
            pS = tl.sum(tl.where(here[:, None], prevS, 0.0), 0)
            pz = tl.sum(tl.where(here, prevz, 0.0), 0)
            gv_rows, write_idx, write_ok = _keep(gv_rows, write_idx, write_ok, here, w * GS, w_idx, is_write)
            gw = tl.where(here, tl.sum(GS * v, 0) + Gz, gw)
            ga = tl.where(here, tl.sum(GS * pS, 0) + Gz * pz, ga)
            if HAS_H0:  # a segment start's h = a h0 + b (a = 1 for a read)
                si = tl.load(sidx_ptr + ev, mask=start, other=0).to(tl.int64)
                h0_rows, h0_idx, h0_ok = _keep(h0_rows, h0_idx, h0_ok, here, a * GS, si, start)
                h0_z = tl.where(here, a * Gz, h0_z)
            a_rec = tl.where(start, 0.0, a)
            gS = a_rec * GS
            gz = a_rec * Gz
        _flush(grad_v_ptr, gv_rows, write_idx, write_ok, D, D, DV)
        tl.store(grad_write_w_ptr + write_idx, gw, mask=write_ok != 0)
        tl.store(grad_decay_ptr + write_idx, ga, mask=write_ok != 0)
        if HAS_H0:
            _flush(grad_h0_ptr, h0_rows, h0_idx, h0_ok, D + 1, D, DV)
            tl.store(grad_h0_ptr + h0_idx * (D + 1) + D, h0_z, mask=h0_ok != 0)
