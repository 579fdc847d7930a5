"""The host-resident state's row movement for one decoding step, in two kernels, one program per (sequence,
head) row and all of its 2K lanes at once (``OffloadState._plan`` has decided, per lane, where its slot's row
lives; nothing here decides anything).

The host rows are read and written in place, from the kernels: on CUDA the host table is pinned, and a pinned
tensor's address is valid on the device (Triton resolves it with ``cuPointerGetAttribute``), so a missed
row comes over the bus when a kernel loads it, without a copy staged on the host and without the host
knowing which rows: no device read, no host synchronisation.

``fill_kernel``: every load first (the evicted lines' rows, the missed and bypassed slots' host rows, the
hit lines' rows), then every store (the evicted rows to the host, the fetched rows into their lines, the
token's table of rows). No lane stores where another lane loads: a victim line is one no lane hits, and a
slot whose row is fetched from the host was not in the cache, so no evicted line held it.

``store_kernel``: the K written rows back, to their lines (dirty) or, for a bypassed lane, to the host.
"""

import triton
import triton.language as tl


@triton.jit
def _rows(base, index, lane_mask, cols, col_mask, ROW: tl.constexpr):
    """``base[index[l] * ROW + c]`` for the lanes in ``lane_mask`` (others 0): a [LANES, COLS] tile."""
    return tl.load(base + index[:, None].to(tl.int64) * ROW + cols[None, :],
                   mask=lane_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def fill_kernel(data, host, table, line, host_row, evict_row, flags, N: tl.constexpr, N_PAD: tl.constexpr,
                ROW: tl.constexpr, COLS: tl.constexpr):
    # line / host_row / evict_row / flags: [R, N] (flat line index into data's rows, host row of the lane's
    # slot, host row of the evicted line's old slot); flags bits: 1 the row is in its line after this step
    # (a hit, or a fetch), 2 fetch it from the host into its line, 4 write the line's old row back first,
    # 8 bypass (the row stays on the host), 16 a duplicate lane (its row is another lane's: no table row).
    r = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, N_PAD)
    live = lanes < N
    at = r * N + lanes
    f = tl.load(flags + at, mask=live, other=16)
    ln = tl.load(line + at, mask=live, other=0)
    hr = tl.load(host_row + at, mask=live, other=0)
    er = tl.load(evict_row + at, mask=live, other=0)
    in_line, fetch, evict, bypass = (f & 1) != 0, (f & 2) != 0, (f & 4) != 0, (f & 8) != 0
    cols = tl.arange(0, COLS)
    cmask = cols < ROW
    old = _rows(data, ln, evict, cols, cmask, ROW)
    from_host = _rows(host, hr, fetch | bypass, cols, cmask, ROW)
    cached = _rows(data, ln, in_line & ~fetch, cols, cmask, ROW)
    pair = cmask[None, :]
    tl.store(host + er[:, None].to(tl.int64) * ROW + cols[None, :], old, mask=evict[:, None] & pair)
    tl.store(data + ln[:, None].to(tl.int64) * ROW + cols[None, :], from_host, mask=fetch[:, None] & pair)
    rows = tl.where((fetch | bypass)[:, None], from_host, cached)
    tl.store(table + at[:, None] * ROW + cols[None, :], rows, mask=((in_line | bypass) & live)[:, None] & pair)


@triton.jit
def store_kernel(data, host, dirty, table, line, host_row, flags, K: tl.constexpr, K_PAD: tl.constexpr,
                 N: tl.constexpr, ROW: tl.constexpr, COLS: tl.constexpr):
    # The first K lanes of each row are its writes: their table rows go to their lines (marked dirty) or,
    # bypassed, to the host. flags as in fill_kernel.
    r = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, K_PAD)
    live = lanes < K
    at = r * N + lanes
    f = tl.load(flags + at, mask=live, other=0)
    ln = tl.load(line + at, mask=live, other=0)
    hr = tl.load(host_row + at, mask=live, other=0)
    in_line, bypass = live & ((f & 1) != 0), live & ((f & 8) != 0)
    cols = tl.arange(0, COLS)
    cmask = cols < ROW
    rows = tl.load(table + at[:, None] * ROW + cols[None, :], mask=(in_line | bypass)[:, None] & cmask[None, :],
                   other=0.0)
    tl.store(data + ln[:, None].to(tl.int64) * ROW + cols[None, :], rows, mask=in_line[:, None] & cmask[None, :])
    tl.store(host + hr[:, None].to(tl.int64) * ROW + cols[None, :], rows, mask=bypass[:, None] & cmask[None, :])
    tl.store(dirty + ln, tl.full([K_PAD], 1, tl.uint8), mask=in_line)  # dirty: the bool tensor as uint8
