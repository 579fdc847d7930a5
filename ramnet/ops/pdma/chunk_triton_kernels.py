"""Jit code of chunked PDMA (launched by ``chunk_triton.py`` beside it): the chunk function of
``chunk.py`` and its hand-derived backward, one program per (sequence, head, d_v slice) walking its
chunks of C tokens in order (forward) or in reverse (backward).

The state lives in global memory as tables: ``S [N*H*M, D]`` (a slice owns its columns) and
``z [NS, N*H*M]`` (one copy per slice: every slice computes z, and a slice that runs ahead must not
overwrite the z another one has yet to read). A chunk gathers the rows of its events' slots,
computes, and stores one row per written slot (the slot's last write in the chunk stores it), with a
barrier before the stores (every gather done) and after them (the next chunk sees them). The
forward also saves the pre-chunk row of every written slot; the backward walks back from the final
table, restoring those rows chunk by chunk, next to an adjoint table of the same shape.

Inside a chunk (CK = C * KP events of each kind, KP = K rounded up to a power of two; padded lanes
and tokens past the sequence's end are masked, their slots -1 for writes and -2 for reads so that
they match no real slot): ``L, W [CK, C]``, the log decay and weight of each token's write to each
event's slot, come from a [CK, C, KP] slot compare reduced over the token's lanes (``_by_slot``;
the backward's transpose reduces the same compare over the events, ``_to_writes``); interval sums
of ``L`` are a product with a strictly triangular 0/1 matrix (``_dot_select``: exact in bf16,
fp32-accurate with x split in three bf16 parts), and ``A @ v`` a [CK, C] x [C, DS] product. The
backward adds each read's share of the adjoint to its slot's row with atomic adds (fp32: the order
of a slot's adds, and so the last bits, can change from run to run).

Register pressure (ptxas for sm_90, K 8, C 16, 8 warps, DS 16): the forward spills about 60 bytes
a thread; the backward spilled about 2.5 KB when it still summed the reads with [CK, CK] match
products; at 4 warps several times more.
"""

import triton
import triton.language as tl

# Sizes that only enter address arithmetic: not specialised, so that a new length or batch does
# not compile a new kernel. D stays specialised (row loads vectorise when it divides by 16).
SHAPE_ARGS = ["T", "H", "M", "NHM", "NEV"]


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """fp32 x fp32 product: ``PREC`` "ieee" (exact fp32 FMA) or "tf32x3" (tensor cores, about
    fp32 accuracy). For the products with C or DS terms per entry (``A @ v`` and its backward)."""
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _bf16_parts(x, UPCAST: tl.constexpr):
    """``x`` (fp32) as hi + mid + lo, three bf16 values whose sum is x to 2**-24 relative (each
    part the rounding of what the ones before leave). ``UPCAST``: the parts back in fp32."""
    hi = x.to(tl.bfloat16)
    rest = x - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    # Both branches spelled out: a return after an `if` is compiled even where the constexpr is true,
    # and two return types do not compile.
    if UPCAST:
        parts = hi.to(tl.float32), mid.to(tl.float32), lo.to(tl.float32)
    else:
        parts = hi, mid, lo
    return parts


@triton.jit
def _dot_select(x, m, UPCAST: tl.constexpr):
    """``x @ m`` for ``m`` of 0s and 1s (token selections), fp32-accurate on bf16 tensor cores: m is
    exact in bf16 and the products of x's three parts are exact in the fp32 accumulator. ``UPCAST``
    (the interpreter, whose bf16 dot multiplies the raw bits) runs the same parts in fp32."""
    hi, mid, lo = _bf16_parts(x, UPCAST)
    if UPCAST:
        acc = tl.dot(lo, m, input_precision="ieee")
        acc = tl.dot(mid, m, acc, input_precision="ieee")
        acc = tl.dot(hi, m, acc, input_precision="ieee")
    else:
        mb = m.to(tl.bfloat16)
        acc = tl.dot(lo, mb)
        acc = tl.dot(mid, mb, acc)
        acc = tl.dot(hi, mb, acc)
    return acc


@triton.jit
def _sequence(pid, H, T, cu_ptr, VARLEN: tl.constexpr):
    """Batch row, head and token range ``[start, end)`` of program ``pid`` = sequence * H + head."""
    n = pid // H
    h = pid % H
    if VARLEN:
        b = 0
        start = tl.load(cu_ptr + n).to(tl.int32)
        end = tl.load(cu_ptr + n + 1).to(tl.int32)
    else:
        b = n
        start = 0
        end = T
    return b, h, start, end


@triton.jit
def _events(t0, end, b, h, T, H, write_idx_ptr, write_w_ptr, decay_ptr, read_idx_ptr, read_w_ptr, min_decay,
            K: tl.constexpr, KP: tl.constexpr, C: tl.constexpr):
    """The chunk's events, lane-minor (event e = token * KP + lane): their token in the chunk,
    validity, index into the ``[B, T, H, K]`` arrays, slots, weights, decay and floored log decay."""
    e = tl.arange(0, C * KP)
    tok = e // KP
    lane = e % KP
    valid = (lane < K) & (t0 + tok < end)
    ev = ((b * T + t0 + tok).to(tl.int64) * H + h) * K + lane
    ws = tl.load(write_idx_ptr + ev, mask=valid, other=-1).to(tl.int32)
    rs = tl.load(read_idx_ptr + ev, mask=valid, other=-2).to(tl.int32)
    ww = tl.load(write_w_ptr + ev, mask=valid, other=0.0).to(tl.float32)
    rw = tl.load(read_w_ptr + ev, mask=valid, other=0.0).to(tl.float32)
    decay = tl.load(decay_ptr + ev, mask=valid, other=1.0).to(tl.float32)
    la = tl.log(tl.maximum(decay, min_decay))  # the floored log decay of chunk.log_decay
    return tok, valid, ev, ws, rs, ww, rw, decay, la


@triton.jit
def _token_rows(t0, end, b, h, T, H, C: tl.constexpr):
    """Row of each of the chunk's C tokens in ``[B, T, H, ...]`` arrays, and whether it exists."""
    ti = tl.arange(0, C)
    return (b * T + t0 + ti).to(tl.int64) * H + h, t0 + ti < end


@triton.jit
def _strictly_later(C: tl.constexpr):
    """``[C, C]``: 1 where i'' > i' (rows i'', columns i'): ``L @ this`` sums L over (i', end]."""
    ti = tl.arange(0, C)
    return tl.where(ti[:, None] > ti[None, :], 1.0, 0.0)


@triton.jit
def _token_match(slots, ws, C: tl.constexpr, KP: tl.constexpr):
    """``[CK, C, KP]``: whether lane j of token i writes the slot of each event of ``slots``."""
    return slots[:, None, None] == tl.reshape(ws, (C, KP))[None, :, :]


@triton.jit
def _by_slot(slots, ws, la, ww, C: tl.constexpr, KP: tl.constexpr):
    """``[CK, C]`` each: for each event of ``slots`` and each token i of the chunk, the log decay
    and the weight of token i's write to that event's slot (0 where it writes elsewhere): the
    token match reduced over the token's lanes (one matches at most: a token's slots are distinct)."""
    match = _token_match(slots, ws, C, KP)
    L = tl.sum(tl.where(match, tl.reshape(la, (C, KP))[None, :, :], 0.0), 2)
    W = tl.sum(tl.where(match, tl.reshape(ww, (C, KP))[None, :, :], 0.0), 2)
    return L, W


@triton.jit
def _to_writes(slots, ws, x, C: tl.constexpr, KP: tl.constexpr):
    """The transpose of ``_by_slot``: for each write (token i, lane j), the sum of ``x [CK, C]``
    at column i over the events of ``slots`` whose slot it writes, ``[CK]``."""
    # The compare written the other way round from _token_match's: the compiler would otherwise
    # keep that [CK, C, KP] mask alive from the forward's terms to here.
    match = tl.reshape(ws, (C, KP))[None, :, :] == slots[:, None, None]
    return tl.reshape(tl.sum(tl.where(match, x[:, :, None], 0.0), 0), (C * KP,))


@triton.jit
def _read_terms(rs, ws, tok, la, ww, later, UPCAST: tl.constexpr, C: tl.constexpr, KP: tl.constexpr):
    """For each read: its slot's log decays up to its token (masked ``L``), the weight of each
    earlier-or-same token's write into what it reads (``A = E * W``) and the decay of the
    pre-chunk content ``P``."""
    L, W = _by_slot(rs, ws, la, ww, C, KP)
    causal = tl.arange(0, C)[None, :] <= tok[:, None]
    L = tl.where(causal, L, 0.0)
    E = tl.where(causal, tl.exp(_dot_select(L, later, UPCAST)), 0.0)
    return causal, E, E * W, tl.exp(tl.sum(L, 1))


@triton.jit
def _write_terms(ws, la, ww, later, UPCAST: tl.constexpr, C: tl.constexpr, KP: tl.constexpr):
    """``_read_terms`` for each write's slot at the chunk's end (no mask: the slot's later writes
    count)."""
    L, W = _by_slot(ws, ws, la, ww, C, KP)
    E = tl.exp(_dot_select(L, later, UPCAST))
    return E, E * W, tl.exp(tl.sum(L, 1))


@triton.jit
def _last_write(ws, tok, valid):
    """Whether each write is its slot's last in the chunk (the one that stores the slot)."""
    later_same = (ws[:, None] == ws[None, :]) & (tok[None, :] > tok[:, None])
    return valid & (tl.sum(later_same.to(tl.int32), 1) == 0)


@triton.jit(do_not_specialize=SHAPE_ARGS)
def chunk_fwd_kernel(write_idx_ptr, write_w_ptr, decay_ptr, read_idx_ptr, read_w_ptr, v_ptr, cu_ptr,
                     S_ptr, z_ptr, saved_S_ptr, saved_z_ptr, o_ptr,
                     T, H, M, D, NHM, eps, min_decay,
                     K: tl.constexpr, KP: tl.constexpr, C: tl.constexpr, DS: tl.constexpr,
                     VARLEN: tl.constexpr, SAVE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Every chunk of one (sequence, head) in order, columns ``[part * DS, (part + 1) * DS)``:
    the reads into ``o [B, T, H, D]``, the written slots' rows into the tables, and (``SAVE``)
    each stored slot's pre-chunk row at its storing event in ``saved_S [B*T*H*K, D]``, ``saved_z``."""
    pid = tl.program_id(0)
    part = tl.program_id(1)
    b, h, start, end = _sequence(pid, H, T, cu_ptr, VARLEN)
    row0 = pid.to(tl.int64) * M
    cols = part * DS + tl.arange(0, DS)
    cmask = cols < D
    z_tab = z_ptr + part.to(tl.int64) * NHM + row0
    later = _strictly_later(C)
    for t0 in range(start, end, C):
        tok, valid, ev, ws, rs, ww, rw, decay, la = _events(
            t0, end, b, h, T, H, write_idx_ptr, write_w_ptr, decay_ptr, read_idx_ptr, read_w_ptr, min_decay, K, KP, C)
        rows, tok_ok = _token_rows(t0, end, b, h, T, H, C)
        tmask = tok_ok[:, None] & cmask[None, :]
        vc = tl.load(v_ptr + rows[:, None] * D + cols[None, :], mask=tmask, other=0.0).to(tl.float32)
        _, _, A_r, P_r = _read_terms(rs, ws, tok, la, ww, later, UPCAST, C, KP)
        S_r = tl.load(S_ptr + (row0 + rs)[:, None] * D + cols[None, :], mask=valid[:, None] & cmask[None, :],
                      other=0.0)
        z_r = tl.load(z_tab + rs, mask=valid, other=1.0)
        num = P_r[:, None] * S_r + _dot(A_r, vc, PREC)
        den = P_r * z_r + tl.sum(A_r, 1)
        out = tl.sum(tl.reshape(rw[:, None] * num / (den + eps)[:, None], (C, KP, DS)), 1)
        tl.store(o_ptr + rows[:, None] * D + cols[None, :], out, mask=tmask)

        _, A_w, P_w = _write_terms(ws, la, ww, later, UPCAST, C, KP)
        last = _last_write(ws, tok, valid)
        lmask = last[:, None] & cmask[None, :]
        S_w = tl.load(S_ptr + (row0 + ws)[:, None] * D + cols[None, :], mask=lmask, other=0.0)
        z_w = tl.load(z_tab + ws, mask=last, other=0.0)
        S_end = P_w[:, None] * S_w + _dot(A_w, vc, PREC)
        z_end = P_w * z_w + tl.sum(A_w, 1)
        tl.debug_barrier()  # every gather of this chunk is done before a row changes
        tl.store(S_ptr + (row0 + ws)[:, None] * D + cols[None, :], S_end, mask=lmask)
        tl.store(z_tab + ws, z_end, mask=last)
        if SAVE:
            tl.store(saved_S_ptr + ev[:, None] * D + cols[None, :], S_w, mask=lmask)
            if part == 0:
                tl.store(saved_z_ptr + ev, z_w, mask=last)
        tl.debug_barrier()  # the next chunk gathers the rows just stored


@triton.jit(do_not_specialize=SHAPE_ARGS)
def chunk_bwd_kernel(write_idx_ptr, write_w_ptr, decay_ptr, read_idx_ptr, read_w_ptr, v_ptr, cu_ptr,
                     S_ptr, z_ptr, saved_S_ptr, saved_z_ptr, dS_ptr, dz_ptr, grad_o_ptr,
                     grad_write_w_ptr, grad_decay_ptr, grad_read_w_ptr, grad_v_ptr,
                     T, H, M, D, NHM, NEV, eps, min_decay,
                     K: tl.constexpr, KP: tl.constexpr, C: tl.constexpr, DS: tl.constexpr,
                     VARLEN: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """The chunks of one (sequence, head, slice) in reverse. ``S, z`` start as the final tables
    and are rolled back to each chunk's start from the saved rows; ``dS, dz`` (same layout) hold
    the adjoint of the state after the chunk and are replaced, slot by slot, by the adjoint before
    it. Stores the gradients of v (its columns) and this slice's share of those of the write
    weights, decays and read weights (``[NS, B*T*H*K]``, summed by the caller)."""
    pid = tl.program_id(0)
    part = tl.program_id(1)
    b, h, start, end = _sequence(pid, H, T, cu_ptr, VARLEN)
    row0 = pid.to(tl.int64) * M
    cols = part * DS + tl.arange(0, DS)
    cmask = cols < D
    z_tab = z_ptr + part.to(tl.int64) * NHM + row0
    dz_tab = dz_ptr + part.to(tl.int64) * NHM + row0
    grad_base = part.to(tl.int64) * NEV
    later = _strictly_later(C)
    chunks = tl.cdiv(end - start, C)
    for c in range(0, chunks):
        t0 = start + (chunks - 1 - c) * C
        tok, valid, ev, ws, rs, ww, rw, decay, la = _events(
            t0, end, b, h, T, H, write_idx_ptr, write_w_ptr, decay_ptr, read_idx_ptr, read_w_ptr, min_decay, K, KP, C)
        rows, tok_ok = _token_rows(t0, end, b, h, T, H, C)
        tmask = tok_ok[:, None] & cmask[None, :]
        rmask = valid[:, None] & cmask[None, :]
        vc = tl.load(v_ptr + rows[:, None] * D + cols[None, :], mask=tmask, other=0.0).to(tl.float32)
        ev_rows = (b * T + t0 + tok).to(tl.int64) * H + h
        do = tl.load(grad_o_ptr + ev_rows[:, None] * D + cols[None, :], mask=rmask, other=0.0).to(tl.float32)
        # The forward's decays and weights again (they need no state).
        causal, E_r, A_r, P_r = _read_terms(rs, ws, tok, la, ww, later, UPCAST, C, KP)
        E_w, A_w, P_w = _write_terms(ws, la, ww, later, UPCAST, C, KP)
        last = _last_write(ws, tok, valid)
        lmask = last[:, None] & cmask[None, :]
        tl.debug_barrier()  # the previous chunk's adjoint rows are stored
        S_w = tl.load(saved_S_ptr + ev[:, None] * D + cols[None, :], mask=lmask, other=0.0)
        z_w = tl.load(saved_z_ptr + ev, mask=last, other=0.0)
        tl.store(S_ptr + (row0 + ws)[:, None] * D + cols[None, :], S_w, mask=lmask)  # roll back
        tl.store(z_tab + ws, z_w, mask=last)
        tl.debug_barrier()
        S_r = tl.load(S_ptr + (row0 + rs)[:, None] * D + cols[None, :], mask=rmask, other=0.0)
        z_r = tl.load(z_tab + rs, mask=valid, other=1.0)
        G_w = tl.load(dS_ptr + (row0 + ws)[:, None] * D + cols[None, :], mask=lmask, other=0.0)
        Gz_w = tl.load(dz_tab + ws, mask=last, other=0.0)
        tl.debug_barrier()  # every adjoint row is read before any is replaced

        # Reads: o = sum r N / (D + eps), N = P S_old + A v, D = P z_old + sum A.
        num = P_r[:, None] * S_r + _dot(A_r, vc, PREC)
        inv = 1.0 / (P_r * z_r + tl.sum(A_r, 1) + eps)
        d_read_w = tl.sum(do * num, 1) * inv
        dN = (rw * inv)[:, None] * do
        dD = -rw * d_read_w * inv
        dP_r = tl.sum(dN * S_r, 1) + dD * z_r
        dA_r = _dot(dN, tl.trans(vc), PREC) + dD[:, None]
        # Writes (their slot's last): S_end = P S_old + A v, z_end = P z_old + sum A.
        dP_w = tl.sum(G_w * S_w, 1) + Gz_w * z_w
        dA_w = _dot(G_w, tl.trans(vc), PREC) + Gz_w[:, None]
        dv = _dot(tl.trans(A_r), dN, PREC) + _dot(tl.trans(A_w), G_w, PREC)
        tl.store(grad_v_ptr + rows[:, None] * D + cols[None, :], dv, mask=tmask)
        # A = E W with E = exp(L @ later), P = exp(sum L).
        dL_r = tl.where(causal, _dot_select(dA_r * A_r, tl.trans(later), UPCAST) + (P_r * dP_r)[:, None], 0.0)
        dL_w = _dot_select(dA_w * A_w, tl.trans(later), UPCAST) + (P_w * dP_w)[:, None]
        RS = P_r[:, None] * dN  # each read's share of its slot's adjoint before the chunk
        RSz = P_r * dD

        # Back through L and W (_by_slot): each write collects the adjoints of the events of its
        # slot at its token's column.
        d_la = _to_writes(rs, ws, dL_r, C, KP) + _to_writes(ws, ws, dL_w, C, KP)
        d_w = _to_writes(rs, ws, dA_r * E_r, C, KP) + _to_writes(ws, ws, dA_w * E_w, C, KP)
        # d la / d decay = 1 / decay, with the floor's value where it stands in (chunk.log_decay).
        tl.store(grad_decay_ptr + grad_base + ev, d_la / tl.maximum(decay, min_decay), mask=valid)
        tl.store(grad_write_w_ptr + grad_base + ev, d_w, mask=valid)
        tl.store(grad_read_w_ptr + grad_base + ev, d_read_w, mask=valid)

        # The adjoint before the chunk: P G at the slots the chunk writes (stored by each slot's last
        # write), G at the others (left in place), plus each read's P dN, added atomically: a slot's
        # reads add up, in any order. (The version before summed them with [CK, CK] slot-match products,
        # x in three bf16 parts; with it the K = 8 gradients came out wrong on Hopper, cause not yet
        # known: docs/kernels.md. The adds need no match tile either.)
        tl.store(dS_ptr + (row0 + ws)[:, None] * D + cols[None, :], P_w[:, None] * G_w, mask=lmask)
        tl.store(dz_tab + ws, P_w * Gz_w, mask=last)
        tl.debug_barrier()  # a written slot's row is replaced before its reads add to it
        tl.atomic_add(dS_ptr + (row0 + rs)[:, None] * D + cols[None, :], RS, mask=rmask)
        tl.atomic_add(dz_tab + rs, RSz, mask=valid)
