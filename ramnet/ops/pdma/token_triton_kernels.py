"""Jit code of token-by-token PDMA (launched by ``token_triton.py`` beside it): one program per
(sequence, head, d_v slice) walks its tokens in order (forward) or in reverse (backward), each token
gathering, updating and storing the K rows it writes and gathering the K rows it reads.

The state lives as tables in global memory: ``S [N*H*M, D]`` (a slice
owns its columns) and ``z [NS, N*H*M]`` (one copy per slice, so that no slice reads a z another has
already moved on). At the paper's shape the tables of every (sequence, head) of a training step fit
in the GPU's L2 cache (B8 H16 M1024: 34 MB against the H100's 50 MB), so a token's gathers are L2
hits, not HBM traffic: the state stays on the chip. There is no sort and no per-event state, and a
token costs one round trip to L2 and K x K slot compares.

Forward, per token: gather the written rows (pre-write) and the read rows, write
``S = decay S + w v``, ``z = decay z + w``; a read of a slot the token writes takes the new row
from registers (a [K, K] slot match; a token's K slots are distinct), the others the gathered one;
``o = sum_j r_j S_j / (z_j + eps)``. A barrier before the stores (every thread's gathers are done:
a row's entries are held by several threads, z's by replicated lanes) and one after them (the next
token's gathers see them). With ``SAVE`` the pre-write rows go to ``saved_S [B*T*H*K, D]`` and
``saved_z`` at their write event, for the backward.

L2 eviction hints (``KEEP`` for the tables' rows, ``STREAM`` for what is read or written once:
the tokens' inputs, outputs, saved rows and gradients) ask the cache to keep the tables over the
streams (an empty string: no hint).

Backward, per token from the last: the tables hold the state after the token and ``dS, dz`` (same
layout) the adjoint of that state from the later tokens. The read's gradient and its share of the
adjoint at its rows come first; a written row's adjoint is what the table holds plus the share of
a read of the same slot (the same [K, K] match); from it the gradients of v, the write weight and
the decay (against the saved pre-write row); then the written rows of both tables are rolled back
(``S`` to the saved row, ``dS`` to ``decay * adjoint``) and the reads' shares stored at the read
rows the token does not write. z's adjoint is linear in the reads' adjoints, so each slice carries
its own share in its own ``dz`` and its gradients are shares that the caller sums.
"""

import triton
import triton.language as tl

# Sizes that only enter address arithmetic: not specialised, so that a new length or batch does
# not compile a new kernel. D stays specialised (row loads vectorise when it divides by 16).
SHAPE_ARGS = ["T", "H", "M", "NHM", "NEV"]


@triton.jit
def _program(T, H, M, D, NHM, cu_ptr, VARLEN: tl.constexpr, DS: tl.constexpr):
    """What program (sequence * H + head, slice) owns: its batch row, head and token range
    ``[start, end)``, its columns of d_v, and the offsets of its rows in the S table (a ``[1, DS]``
    tile of its columns) and in its slice's z table."""
    pid = tl.program_id(0)
    part = tl.program_id(1)
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
    row0 = pid.to(tl.int64) * M
    cols = part * DS + tl.arange(0, DS)
    return b, h, start, end, cols, cols < D, row0 * D + cols[None, :], part.to(tl.int64) * NHM + row0


@triton.jit
def _token(t, start, end, b, h, T, H, D, cols, cmask, write_idx_ptr, write_w_ptr, decay_ptr, read_idx_ptr, read_w_ptr,
           v_ptr, K: tl.constexpr, KP: tl.constexpr, STREAM: tl.constexpr):
    """Token t's row in ``[B, T, H, ...]`` arrays, its events' index into ``[B, T, H, K]`` arrays and
    validity (padded lanes and t outside ``[start, end)`` are off, write slots -1 and read slots -2
    there so that they match no real slot), its columns' validity (``here``), slots, weights, decays
    and v's columns. Independent of the state, so the loops load the next token's while this one's
    gathers are in flight."""
    lane = tl.arange(0, KP)
    lane_t = lane * 0 + t  # a tensor also where t is a Python int (the interpreter's first token)
    valid = (lane < K) & (lane_t >= start) & (lane_t < end)
    col_t = cols * 0 + t
    here = cmask & (col_t >= start) & (col_t < end)
    row = (b * T + t).to(tl.int64) * H + h
    ev = row * K + lane
    ws = tl.load(write_idx_ptr + ev, mask=valid, other=-1, eviction_policy=STREAM).to(tl.int64)
    rs = tl.load(read_idx_ptr + ev, mask=valid, other=-2, eviction_policy=STREAM).to(tl.int64)
    ww = tl.load(write_w_ptr + ev, mask=valid, other=0.0, eviction_policy=STREAM).to(tl.float32)
    decay = tl.load(decay_ptr + ev, mask=valid, other=1.0, eviction_policy=STREAM).to(tl.float32)
    rw = tl.load(read_w_ptr + ev, mask=valid, other=0.0, eviction_policy=STREAM).to(tl.float32)
    vt = tl.load(v_ptr + row * D + cols, mask=here, other=0.0, eviction_policy=STREAM).to(tl.float32)
    return row, ev, valid, here, ws, rs, ww, decay, rw, vt


@triton.jit
def _saved(token, cols, cmask, D, saved_S_ptr, saved_z_ptr, grad_o_ptr, STREAM: tl.constexpr):
    """What the backward reads of a token besides ``_token``'s and the tables: its writes' pre-write
    rows (saved by the forward) and the output's gradient. Independent of the tables, so loaded a
    token ahead too."""
    row, ev, valid, here = token[0], token[1], token[2], token[3]
    S_old = tl.load(saved_S_ptr + ev[:, None] * D + cols[None, :], mask=valid[:, None] & cmask[None, :], other=0.0,
                    eviction_policy=STREAM)
    z_old = tl.load(saved_z_ptr + ev, mask=valid, other=1.0, eviction_policy=STREAM)
    go = tl.load(grad_o_ptr + row * D + cols, mask=here, other=0.0, eviction_policy=STREAM)
    return S_old, z_old, go.to(tl.float32)


@triton.jit
def _same_slot(rs, ws):
    """``match [KP, KP]``: whether read j and write i of a token address the same slot (a token's
    slots are distinct, so a read matches at most one write), and how many writes each read matches
    (0 or 1)."""
    match = rs[:, None] == ws[None, :]
    return match, tl.sum(match.to(tl.int32), 1)


@triton.jit
def _rows_of(x, match):
    """``[KP, DS]``: for each read j, row i of ``x`` where ``match[j, i]`` (at most one i), else 0."""
    return tl.sum(tl.where(match[:, :, None], x[None, :, :], 0.0), 1)


@triton.jit(do_not_specialize=SHAPE_ARGS)
def token_fwd_kernel(write_idx_ptr, write_w_ptr, decay_ptr, read_idx_ptr, read_w_ptr, v_ptr, cu_ptr,
                     S_ptr, z_ptr, saved_S_ptr, saved_z_ptr, o_ptr, T, H, M, D, NHM, eps,
                     K: tl.constexpr, KP: tl.constexpr, DS: tl.constexpr, VARLEN: tl.constexpr,
                     SAVE: tl.constexpr, KEEP: tl.constexpr, STREAM: tl.constexpr):
    """The tokens of one (sequence, head) in order, one slice of d_v's columns: the
    reads into ``o [B, T, H, D]``, the written rows into the tables and (``SAVE``) the pre-write rows
    at their events."""
    b, h, start, end, cols, cmask, S_row, z_row = _program(T, H, M, D, NHM, cu_ptr, VARLEN, DS)
    S_tab = S_ptr + S_row
    z_tab = z_ptr + z_row
    nxt = _token(start, start, end, b, h, T, H, D, cols, cmask, write_idx_ptr, write_w_ptr, decay_ptr, read_idx_ptr,
                 read_w_ptr, v_ptr, K, KP, STREAM)
    for t in range(start, end):
        row, ev, valid, _, ws, rs, ww, decay, rw, vt = nxt
        rmask = valid[:, None] & cmask[None, :]
        S_w = tl.load(S_tab + ws[:, None] * D, mask=rmask, other=0.0, eviction_policy=KEEP)
        z_w = tl.load(z_tab + ws, mask=valid, other=1.0, eviction_policy=KEEP)
        S_r = tl.load(S_tab + rs[:, None] * D, mask=rmask, other=0.0, eviction_policy=KEEP)
        z_r = tl.load(z_tab + rs, mask=valid, other=1.0, eviction_policy=KEEP)
        nxt = _token(t + 1, start, end, b, h, T, H, D, cols, cmask, write_idx_ptr, write_w_ptr, decay_ptr, read_idx_ptr,
                     read_w_ptr, v_ptr, K, KP, STREAM)
        S_new = decay[:, None] * S_w + ww[:, None] * vt[None, :]
        z_new = decay * z_w + ww
        match, hits = _same_slot(rs, ws)
        hit = hits > 0
        S_r = tl.where(hit[:, None], _rows_of(S_new, match), S_r)
        z_r = tl.where(hit, tl.sum(tl.where(match, z_new[None, :], 0.0), 1), z_r)
        out = tl.sum((rw / (z_r + eps))[:, None] * S_r, 0)
        tl.store(o_ptr + row * D + cols, out, mask=cmask, eviction_policy=STREAM)
        if SAVE:
            tl.store(saved_S_ptr + ev[:, None] * D + cols[None, :], S_w, mask=rmask, eviction_policy=STREAM)
            if tl.program_id(1) == 0:  # one slice saves z (every slice computes the same z)
                tl.store(saved_z_ptr + ev, z_w, mask=valid, eviction_policy=STREAM)
        tl.debug_barrier()  # every thread's gathers of this token are done before a row changes
        tl.store(S_tab + ws[:, None] * D, S_new, mask=rmask, eviction_policy=KEEP)
        tl.store(z_tab + ws, z_new, mask=valid, eviction_policy=KEEP)
        tl.debug_barrier()  # the next token gathers the rows just stored


@triton.jit(do_not_specialize=SHAPE_ARGS)
def token_bwd_kernel(write_idx_ptr, write_w_ptr, decay_ptr, read_idx_ptr, read_w_ptr, v_ptr, cu_ptr,
                     S_ptr, z_ptr, saved_S_ptr, saved_z_ptr, dS_ptr, dz_ptr, grad_o_ptr,
                     grad_write_w_ptr, grad_decay_ptr, grad_read_w_ptr, grad_v_ptr, T, H, M, D, NHM, NEV, eps,
                     K: tl.constexpr, KP: tl.constexpr, DS: tl.constexpr, VARLEN: tl.constexpr,
                     KEEP: tl.constexpr, STREAM: tl.constexpr):
    """The tokens of one (sequence, head, slice) in reverse. ``S, z`` start as the final tables and
    are rolled back token by token from the saved rows; ``dS, dz`` hold the adjoint of the state
    after the token and become the adjoint before it. Stores v's gradient (its columns) and this
    slice's share of those of the write weights, decays and read weights (``[NS, B*T*H*K]``)."""
    b, h, start, end, cols, cmask, S_row, z_row = _program(T, H, M, D, NHM, cu_ptr, VARLEN, DS)
    S_tab, dS_tab = S_ptr + S_row, dS_ptr + S_row
    z_tab, dz_tab = z_ptr + z_row, dz_ptr + z_row
    grad_base = tl.program_id(1).to(tl.int64) * NEV
    nxt = _token(end - 1, start, end, b, h, T, H, D, cols, cmask, write_idx_ptr, write_w_ptr, decay_ptr, read_idx_ptr,
                 read_w_ptr, v_ptr, K, KP, STREAM)
    nxt_saved = _saved(nxt, cols, cmask, D, saved_S_ptr, saved_z_ptr, grad_o_ptr, STREAM)
    for i in range(start, end):
        t = end - 1 - (i - start)
        row, ev, valid, _, ws, rs, ww, decay, rw, vt = nxt
        S_old, z_old, go = nxt_saved
        rmask = valid[:, None] & cmask[None, :]
        S_r = tl.load(S_tab + rs[:, None] * D, mask=rmask, other=0.0, eviction_policy=KEEP)
        z_r = tl.load(z_tab + rs, mask=valid, other=1.0, eviction_policy=KEEP)
        G_r = tl.load(dS_tab + rs[:, None] * D, mask=rmask, other=0.0, eviction_policy=KEEP)
        gz_r = tl.load(dz_tab + rs, mask=valid, other=0.0, eviction_policy=KEEP)
        G_w = tl.load(dS_tab + ws[:, None] * D, mask=rmask, other=0.0, eviction_policy=KEEP)
        gz_w = tl.load(dz_tab + ws, mask=valid, other=0.0, eviction_policy=KEEP)
        nxt = _token(t - 1, start, end, b, h, T, H, D, cols, cmask, write_idx_ptr, write_w_ptr, decay_ptr, read_idx_ptr,
                     read_w_ptr, v_ptr, K, KP, STREAM)
        nxt_saved = _saved(nxt, cols, cmask, D, saved_S_ptr, saved_z_ptr, grad_o_ptr, STREAM)
        # The read: o = sum_j r_j S_j / (z_j + eps), with S_j, z_j the state after the token's write.
        den = z_r + eps
        u = tl.sum(S_r * go[None, :], 1)
        tl.store(grad_read_w_ptr + grad_base + ev, u / den, mask=valid, eviction_policy=STREAM)
        c_S = (rw / den)[:, None] * go[None, :]
        c_z = -rw * u / (den * den)
        # The write: S = decay S_old + w v, its adjoint the table's plus a same-slot read's share.
        match, hits = _same_slot(rs, ws)
        G_w += tl.sum(tl.where(match[:, :, None], c_S[:, None, :], 0.0), 0)
        gz_w += tl.sum(tl.where(match, c_z[:, None], 0.0), 0)
        tl.store(grad_v_ptr + row * D + cols, tl.sum(ww[:, None] * G_w, 0), mask=cmask, eviction_policy=STREAM)
        tl.store(grad_write_w_ptr + grad_base + ev, tl.sum(G_w * vt[None, :], 1) + gz_w, mask=valid,
                 eviction_policy=STREAM)
        tl.store(grad_decay_ptr + grad_base + ev, tl.sum(G_w * S_old, 1) + gz_w * z_old, mask=valid,
                 eviction_policy=STREAM)
        tl.debug_barrier()  # every thread's gathers of this token are done before a row changes
        tl.store(S_tab + ws[:, None] * D, S_old, mask=rmask, eviction_policy=KEEP)
        tl.store(z_tab + ws, z_old, mask=valid, eviction_policy=KEEP)
        tl.store(dS_tab + ws[:, None] * D, decay[:, None] * G_w, mask=rmask, eviction_policy=KEEP)
        tl.store(dz_tab + ws, decay * gz_w, mask=valid, eviction_policy=KEEP)
        alone = valid & (hits == 0)  # reads of slots the token does not write
        tl.store(dS_tab + rs[:, None] * D, G_r + c_S, mask=alone[:, None] & cmask[None, :], eviction_policy=KEEP)
        tl.store(dz_tab + rs, gz_r + c_z, mask=alone, eviction_policy=KEEP)
        tl.debug_barrier()  # the token before gathers the rows just stored
