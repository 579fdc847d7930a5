"""The host-resident state's decoding step around the step kernel, in two kernels, one program per (sequence,
head) row and all of its 2K lanes at once: the cache's plan and the rows it moves before the step, and the
written rows stored after it.

The host rows are read and written in place, from the kernels: on CUDA the host table is pinned, and a pinned
tensor's address is valid on the device (Triton resolves it with ``cuPointerGetAttribute``), so a missed
row comes over the bus when a kernel loads it, without a copy staged on the host and without the host
knowing which rows: no device read, no host synchronisation.

``plan_fill_kernel``: ``OffloadState._plan`` for one row's lanes in registers, then the rows moved. Every
load comes before any store, across the program's warps too (a barrier between them): first the metadata of
the lanes' sets, then the missed slots' host rows and the hit lines' rows (issued as soon as the hits are known,
before the victims are ranked, so that the bus's latency overlaps the ranking), the evicted lines' rows; then
the new metadata, the evicted rows to the host, the fetched rows into their lines, the token's table of rows.
No lane stores where another lane loads, since a victim line is one no lane hits, and a slot whose row is
fetched was not in the cache, so no evicted line held it. The lanes' lines are distinct, so no two lanes store
to one place.

``step_store_kernel``: the step on the table (``table_step``, ``ops/ram/step_kernels.py``), then the K
written rows back, to their lines (dirty) or, for a bypassed lane, to the host; and the step's clock.
"""

import triton
import triton.language as tl

from ..ops.ram.step_kernels import table_step

BIG = tl.constexpr(2**63 - 1)  # the score of a line no miss may take (claimed by a hit, or padding)


@triton.jit
def plan_fill_kernel(slots, tags, last, count, dirty, counts, data, host, table, line_out, host_row_out, flags_out,
                     clock, memory_slots, N: tl.constexpr, N_PAD: tl.constexpr, SETS: tl.constexpr,
                     W: tl.constexpr, W_PAD: tl.constexpr, LFU: tl.constexpr, ROW: tl.constexpr, COLS: tl.constexpr):
    # One program per (sequence, head) row r: OffloadState._plan for its N = 2K lanes (slots [R, N], writes
    # then reads), in registers ([N, W] per-lane views of their sets, [N, N] and [N, W, W] comparisons), then
    # the rows moved. The per-line tensors are flat [R * SETS * W (+1)]; dirty as uint8; counts [6] summed
    # atomically (STATS' order); clock: a device scalar, the last step's time (this step's is clock + 1:
    # step_store_kernel advances it after the step). Outputs per lane: its line, its slot's host row and its flags
    # (_plan's).
    r = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, N_PAD)
    live = lanes < N
    req = tl.load(slots + r * N + lanes, mask=live, other=-1).to(tl.int64)
    ways = tl.arange(0, W_PAD)
    wlive = ways < W
    sets = tl.where(live, req % SETS, 0)
    base = (r * SETS + sets) * W
    at = base[:, None] + ways[None, :]  # [N, W]
    in_set = live[:, None] & wlive[None, :]
    tag = tl.load(tags + at, mask=in_set, other=-2).to(tl.int64)
    # The ranks and dirty bits of the whole set, loaded with its tags rather than after the victim is known:
    # one dependent round trip less.
    rank = tl.load(last + at, mask=in_set, other=0).to(tl.int64)
    set_dirty = tl.load(dirty + at, mask=in_set, other=0).to(tl.int32)
    if LFU:  # the use count, then the last use
        uses = tl.load(count + at, mask=in_set, other=0).to(tl.int64)
        rank = uses * 4294967296 + rank
    else:
        uses = tl.zeros([N_PAD, W_PAD], dtype=tl.int64)
    match = (tag == req[:, None]) & in_set
    hit = tl.max(match.to(tl.int32), axis=1) > 0
    hit_way = tl.argmax(match.to(tl.int32), axis=1)  # the first matching way (a slot is in one line at most)
    earlier = lanes[None, :] < lanes[:, None]  # [j, i]: lane i before lane j
    dup = live & (tl.max(((req[:, None] == req[None, :]) & earlier & live[None, :]).to(tl.int32), axis=1) > 0)
    live_hit = hit & ~dup
    miss = live & ~hit & ~dup
    # The rows a lane needs whatever the ranking below decides, issued before it so that the bus's latency
    # overlaps it: a missed slot's host row (it is fetched into a line or bypasses: taken | bypass == miss) and
    # a hit line's row (in_line & ~taken == live & hit).
    cols = tl.arange(0, COLS)
    cmask = cols[None, :] < ROW
    host_row = r * memory_slots + req
    from_host = tl.load(host + host_row[:, None] * ROW + cols[None, :], mask=miss[:, None] & cmask, other=0.0)
    cached = tl.load(data + (base + hit_way)[:, None] * ROW + cols[None, :], mask=(live & hit)[:, None] & cmask,
                     other=0.0)
    same_set = (sets[:, None] == sets[None, :]) & live[None, :]  # [j, i]
    claim_i = same_set & live_hit[None, :]  # hit lanes i in lane j's set
    claimed = tl.max((claim_i[:, :, None] & (hit_way[None, :, None] == ways[None, None, :])).to(tl.int32),
                     axis=1) > 0  # [j, w]
    big = BIG
    score = tl.where(claimed | ~wlive[None, :], big, tl.where(tag < 0, -1, rank))
    # Each way's place in its set's order (score, then way): the j-th miss of a set takes place j.
    s_w = score[:, :, None]
    s_v = score[:, None, :]
    before = (s_v < s_w) | ((s_v == s_w) & (ways[None, None, :] < ways[None, :, None]))
    place = tl.sum(before.to(tl.int32), axis=2)  # [j, w]
    nth = tl.sum((same_set & miss[None, :] & earlier).to(tl.int32), axis=1)
    chosen = place == nth[:, None]
    victim = tl.sum(tl.where(chosen, ways[None, :], 0), axis=1)
    victim_score = tl.sum(tl.where(chosen, score, 0), axis=1)
    taken = miss & (nth < W) & (victim_score != big)
    bypass = miss & ~taken
    way = tl.where(hit, hit_way, victim)
    line = base + way
    at_way = ways[None, :] == way[:, None]
    old_tag = tl.sum(tl.where(at_way, tag, 0), axis=1)
    old_uses = tl.sum(tl.where(at_way, uses, 0), axis=1)
    was_dirty = tl.sum(tl.where(at_way, set_dirty, 0), axis=1) != 0
    evict = taken & was_dirty & (old_tag >= 0)
    in_line = live & (hit | taken)
    evict_row = r * memory_slots + tl.where(evict, old_tag, 0)
    # The evicted rows: every load before any store (the module docstring says why that is enough).
    line_at = line[:, None] * ROW + cols[None, :]
    old = tl.load(data + line_at, mask=evict[:, None] & cmask, other=0.0)
    # Program order is not enough across warps: a lane's values (its set's tags, its line's dirty bit) sit in
    # several warps, and a warp that ran ahead could store a line's new tag or clean bit before another
    # warp's copy of the lane had loaded the old one (that warp would then skip its part of the eviction).
    # The barrier orders every load of the program before any store.
    tl.debug_barrier()
    # The metadata of the lines claimed (hits) and taken (misses).
    tl.store(last + line, tl.full([N_PAD], 0, tl.int64) + (tl.load(clock) + 1), mask=live_hit | taken)
    tl.store(tags + line, req, mask=taken)
    tl.store(dirty + line, tl.full([N_PAD], 0, tl.uint8), mask=taken)
    if LFU:
        tl.store(count + line, tl.where(taken, 1, old_uses + 1), mask=live_hit | taken)
    tl.atomic_add(counts + 0, tl.sum((live & ~dup).to(tl.int64), axis=0))
    tl.atomic_add(counts + 1, tl.sum(live_hit.to(tl.int64), axis=0))
    tl.atomic_add(counts + 2, tl.sum(miss.to(tl.int64), axis=0))
    tl.atomic_add(counts + 3, tl.sum(bypass.to(tl.int64), axis=0))
    tl.atomic_add(counts + 4, tl.sum(evict.to(tl.int64), axis=0))
    tl.atomic_add(counts + 5, tl.sum(taken.to(tl.int64), axis=0))
    # The rows: evicted ones back, fetched ones in, the token's table.
    tl.store(host + evict_row[:, None] * ROW + cols[None, :], old, mask=evict[:, None] & cmask)
    tl.store(data + line_at, from_host, mask=taken[:, None] & cmask)
    rows = tl.where((taken | bypass)[:, None], from_host, cached)
    out = r * N + lanes
    tl.store(table + out[:, None] * ROW + cols[None, :], rows, mask=(in_line | bypass)[:, None] & cmask)
    flags = (in_line.to(tl.int64) * 1 + taken.to(tl.int64) * 2 + evict.to(tl.int64) * 4 + bypass.to(tl.int64) * 8
             + dup.to(tl.int64) * 16)
    tl.store(line_out + out, line, mask=live)
    tl.store(host_row_out + out, host_row, mask=live)
    tl.store(flags_out + out, flags, mask=live)


@triton.jit
def step_store_kernel(table, slots, write_w, decay, v, read_w, o, offset, num_heads, eps, data, host, dirty, line,
                      host_row, flags, clock, K: tl.constexpr, K_PAD: tl.constexpr, D_V: tl.constexpr,
                      BLOCK_DV: tl.constexpr, COLS: tl.constexpr):
    # One program per (b, h) row r: the step on the row's table (table_step: the dense state's arithmetic and
    # tiles, offset advanced), then the K written rows (the first K lanes) from the table to their lines
    # (marked dirty) or, bypassed, to the host; flags as in plan_fill_kernel. Program 0 advances the clock to
    # the step's time (every plan_fill_kernel program, launched before, has read it).
    r = tl.program_id(0).to(tl.int64)
    table_step(table, slots, write_w, decay, v, read_w, o, offset, num_heads, eps, r, K, K_PAD, D_V, BLOCK_DV, True)
    if r == 0:
        tl.store(clock, tl.load(clock) + 1)
    # The table's written rows were stored by all of the program's threads: the barrier makes them visible to
    # the threads that move them on.
    tl.debug_barrier()
    width = D_V + 1
    lanes = tl.arange(0, K_PAD)
    live = lanes < K
    at = r * 2 * K + lanes
    f = tl.load(flags + at, mask=live, other=0)
    ln = tl.load(line + at, mask=live, other=0)
    hr = tl.load(host_row + at, mask=live, other=0)
    in_line, bypass = live & ((f & 1) != 0), live & ((f & 8) != 0)
    cols = tl.arange(0, COLS)
    cmask = cols < width
    rows = tl.load(table + at[:, None] * width + cols[None, :], mask=(in_line | bypass)[:, None] & cmask[None, :],
                   other=0.0)
    tl.store(data + ln[:, None].to(tl.int64) * width + cols[None, :], rows, mask=in_line[:, None] & cmask[None, :])
    tl.store(host + hr[:, None].to(tl.int64) * width + cols[None, :], rows, mask=bypass[:, None] & cmask[None, :])
    tl.store(dirty + ln, tl.full([K_PAD], 1, tl.uint8), mask=in_line)  # dirty: the bool tensor as uint8
