"""The host-resident state: the whole memory in host memory, a cache of C hot slots per (sequence, head)
on the device.

- Host: the rows ``[S, z]`` of every (sequence, head, slot), ``[B * H * M, d_v + 1]``, on ``host_device``
  (the CPU; pinned when the compute device is CUDA, so that copies can be asynchronous).
- Device: per (sequence, head) a set-associative cache of ``sets x ways`` lines (``C = sets * ways`` slots;
  slot m goes to set ``m % sets``), each with its slot tag, its row, a dirty bit and what the policy ranks
  it by: the last use (LRU) or the use count, ties to the least recently used (LFU).

Before each token's step its K write and K read slots are made resident: hits are claimed first, then each
miss takes the set's lowest-ranked line that this token has not claimed, else, when every line of its set
is this token's (more than ``ways`` of its 2K slots in one set), it bypasses: its row is read and written on
the host directly (counted). The rule is applied to all lanes at once (the j-th miss of a set takes the
set's j-th lowest unclaimed line), with nothing read on the host, in one of two places:

- where the step runs the Triton kernels (CUDA, or the CPU under ``TRITON_INTERPRET=1``;
  ``SlotStore._kernel_step``): ``plan_fill_kernel`` (``offload_kernels.py``) plans a (sequence, head) row
  per program, writes the evicted dirty rows back, fetches the missed rows into their lines and builds the
  token's table of rows; ``step_store_kernel`` steps the table (``table_step``, ``ops/ram/step_kernels.py``),
  advances ``offset``, stores the written rows (to their lines, or to the host where they bypassed) and
  advances the clock. The kernels load and store the host rows in place: the host table is pinned, and a
  pinned tensor's address is valid on the GPU, so no copy is staged. Three launches with the decoder's (which
  writes the 2K slots into the one tensor the plan reads) and no other op on the device;
- otherwise (the torch recurrent path, the prompt streamed through the cache): ``_plan`` in tensor ops,
  then torch copies: the dirty victims back in one copy and the missed rows in one copy (on CUDA through
  pinned memory on a side stream, after reading the missed slots' ids on the host), then the step's
  gathers and scatters.

Both are meant to give the dense state's outputs bit for bit (``SlotStore``: tested under the interpreter;
on the GPU see its docstring), and both plans are checked against a
one-lane-at-a-time simulation of the rule (``tests/states``). The kernel step reads nothing on the host and
allocates the same shapes every token (the clock that ranks the lines is a device counter), so it can be
captured in a CUDA graph and replayed.

The prompt (``prefill="dense"``, the default) goes through the op as for the dense state and its final
state is moved to the host with an empty cache: one layer's dense state exists on the device at a time.
``prefill="stream"`` runs the prompt token by token through the cache instead.

Prefetch: none. The next token's slots depend on its key and query, i.e. on the layer's input at that
token, which is not known before the previous layers have run; what could be prefetched is a guess (the last
token's slots, shifted by one on a CAPE head), which a simulated cache on the traces does not support
(``ramnet trace``'s ``lru_prefetch``, docs/trace.md).
"""

from __future__ import annotations

import torch

from ..ops.checks import check_choice, check_int, check_positive
from ..ops.ram.state import RAMState
from .base import SlotStore

POLICIES = ("lru", "lfu")
STATS = ("accesses", "hits", "misses", "bypasses", "writebacks", "fetched_rows")
# _plan's flag bits per lane (offload_kernels.py reads them)
IN_LINE, FETCH, EVICT, BYPASS, DUPLICATE = 1, 2, 4, 8, 16
DEFAULT_BUDGET = 0.1
# LRU: on the traces of `small` trained to 50M tokens (M 256, 64 heads, 2048 tokens of code) it hits more than
# LFU at budgets of 10% and up (33.8% against 21.4% at 10%, 58.8 against 38.1 at 25%), LFU only at 5% (12.9
# against 9.7). The tiny checkpoint (200 steps, M 64) had favoured LFU at every budget (docs/trace.md).
DEFAULT_POLICY = "lru"
# The default associativity's bound. The kernel plan ranks a set's ways against each other ([2K, W, W] per (sequence,
# head)): at a 5% budget of M = 1024 the sets were fully associative with 49 ways, 16x the comparisons of 16 ways,
# and the offloaded step ran at 0.34x the dense step's tokens/s at B=1 against 0.83x at 10% (16 ways;
# benchmarks/results/offload_graph_h100_75643be.md).
MAX_DEFAULT_WAYS = 16
# Warps of each plan_fill_kernel program (one (sequence, head) row: its 2K lanes' [2K, d_v + 1] rows and [2K, W, W]
# ranking). 4 is Triton's default, the only value measured so far; at B=16 the kernel took 40.6 us a layer against
# about 27 us for the bus to bring its missed rows (benchmarks/results/README.md, offload.md and host_rows_h100.md):
# `benchmarks/profile_offload.py --plan-warps` times others. In the sm_90 SASS (Triton 3.9, LRU, 16 ways) a thread
# runs 2.7k instructions in 166 registers at 4 warps, 1.8k in 96 at 8, 4.2k in 252 at 2, and spills at 1.
PLAN_WARPS = 4


class OffloadState(SlotStore):
    """See the module docstring. ``budget``: the cache's device memory as a fraction of the dense state's
    (its lines' tags, ranks and dirty bits counted, so a little under ``budget * M`` slots per (sequence,
    head)); ``slots``: the slots per (sequence, head) instead; ``ways``: lines per set (default: at most
    ``MAX_DEFAULT_WAYS``, in as few sets as that allows); ``policy``: ``"lru"`` (the default: the traces of the
    trained `small` favour it from a 10% budget up, docs/trace.md) or ``"lfu"``."""

    kind = "offload"

    def __init__(self, budget: float | None = None, slots: int | None = None, ways: int | None = None,
                 policy: str = DEFAULT_POLICY, prefill: str = "dense", host_device="cpu"):
        super().__init__()
        if budget is not None and slots is not None:
            raise ValueError("give the offload cache's size as budget (a fraction of M) or slots, not both")
        if budget is None and slots is None:
            budget = DEFAULT_BUDGET
        if budget is not None:  # a fraction of M in (0, 1]
            budget = check_positive("budget (a fraction of M)", budget, upper=1.0)
        slots = None if slots is None else check_int("slots", slots, 1)
        ways = None if ways is None else check_int("ways", ways, 1)
        check_choice("policy", policy, POLICIES)
        check_choice("prefill", prefill, ("dense", "stream"))
        self.budget, self.slots, self.ways_option, self.policy, self.prefill = budget, slots, ways, policy, prefill
        self.host_device = torch.device(host_device)
        self._counts = torch.zeros(len(STATS), dtype=torch.long)  # on the device once allocated

    @property
    def stats(self) -> dict[str, int]:
        """What the cache did (``STATS``), summed over the tokens since allocation or the last reset (kept
        on the device: reading them synchronises)."""
        return dict(zip(STATS, self._counts.tolist()))

    @stats.setter
    def stats(self, values: dict[str, int]) -> None:
        # in place: a captured step keeps adding to the same tensor
        self._counts.copy_(torch.tensor([int(values[name]) for name in STATS], dtype=torch.long))

    # -- allocation -------------------------------------------------------------------------------------
    def _allocate(self) -> None:
        M = self.memory_slots
        # Slot tags and last uses in int32 where they fit; use counts for LFU only.
        self._tag_type = torch.int32 if M <= torch.iinfo(torch.int32).max else torch.long
        row_bytes = (self.d_v + 1) * self.dtype.itemsize
        line_bytes = row_bytes + 2 * self._tag_type.itemsize + 1 + (
            8 if self.policy == "lfu" else 0)
        if self.slots is not None:
            capacity = self.slots
        else:  # the budget is a fraction of the dense state's bytes: the lines' metadata counts
            capacity = max(1, int(self.budget * M * row_bytes / line_bytes))
        capacity = min(capacity, M)
        if self.ways_option:
            ways = min(self.ways_option, capacity)
            sets = capacity // ways
        else:  # as few sets as MAX_DEFAULT_WAYS allows, their ways filling the capacity (less than a set lost)
            sets = -(-capacity // MAX_DEFAULT_WAYS)
            ways = capacity // sets
        self.sets, self.ways = sets, ways
        self.capacity = self.sets * self.ways
        rows = self.batch * self.heads
        pin = self.device.type == "cuda" and self.host_device.type == "cpu"
        self.host = torch.zeros(rows * M, self.d_v + 1, dtype=self.dtype, device=self.host_device, pin_memory=pin)
        self.host[:, self.d_v] = self.empty_z
        shape = (rows, self.sets, self.ways)
        # Each per-line tensor has one line more, a scratch line past the end: _plan's updates write every
        # lane, the lanes that update nothing into the scratch line (no host read to select the others).
        lines = rows * self.sets * self.ways
        self._lines = lines

        def per_line(fill, dtype, *row):
            flat = torch.full((lines + 1, *row), fill, dtype=dtype, device=self.device)
            return flat, flat[:lines].view(*shape, *row)

        self._tags_flat, self.tags = per_line(-1, self._tag_type)
        self._last_flat, self.last = per_line(0, self._tag_type)
        self._count_flat, self.count = per_line(0, torch.long) if self.policy == "lfu" else (None, None)
        self._dirty_flat, self.dirty = per_line(False, torch.bool)
        self._data_flat, self.data = per_line(0, self.dtype, self.d_v + 1)
        self.clock = torch.zeros((), dtype=torch.long, device=self.device)  # a device counter: capturable
        self._counts = self._counts.to(self.device)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def run(self, memory, q, k, v, cu_seqlens=None):
        if self.prefill == "dense" and self.tokens == 0 and q.shape[1] > 1:
            # The prompt through the op, as for the dense state; its final state goes to the host.
            o, dense = type(memory).run(memory, q, k, v, None, None, cu_seqlens, True)
            self.load_dense(dense)
            return o, self
        return super().run(memory, q, k, v, cu_seqlens)

    # -- moving rows ------------------------------------------------------------------------------------
    def _host_rows(self, index: torch.Tensor) -> torch.Tensor:
        """Host rows ``index [n]`` (device ints) on the device: one copy (pinned, on the side stream)."""
        if self.host_device == self.device:
            return self.host[index]
        rows = self.host[index.to(self.host_device)]
        if self._stream is None:
            return rows.to(self.device)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            out = rows.pin_memory().to(self.device, non_blocking=True)
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        return out

    def _to_host(self, index: torch.Tensor, values: torch.Tensor) -> None:
        if self.host_device == self.device:
            self.host[index] = values
        else:
            self.host[index.to(self.host_device)] = values.to(self.host_device)

    def _host_index(self, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return rows * self.memory_slots + slots

    # -- the cache --------------------------------------------------------------------------------------
    def _lookup(self, slots: torch.Tensor):
        """``(hit, set, way, row)`` of ``slots [R, n]``, each ``[R, n]`` (``row``: the (sequence, head) row)."""
        sets = slots % self.sets
        rows = torch.arange(slots.shape[0], device=slots.device)[:, None].expand_as(slots)
        match = self.tags[rows, sets] == slots[..., None]  # [R, n, ways]
        return match.any(-1), sets, match.int().argmax(-1), rows

    def _plan(self, req: torch.Tensor):
        """Make the slots ``req [R, n]`` (a token's K writes, then its K reads) resident, in the metadata:
        hits are claimed and ranked as just used; each miss, in lane order, takes its set's lowest-ranked
        line that this token has not claimed (the j-th miss of a set the j-th lowest: the same as taking
        them one after the other), else bypasses (every line of its set is this token's). Updates tags,
        ranks, dirty bits and the counters, with fixed-size tensor ops only (nothing read on the host).
        Returns per lane ``[R, n]``: ``line`` (flat index into the lines), ``host_row`` (of its slot),
        ``evict_row`` (the host row of the old slot of a dirty line it evicts) and ``flags`` (IN_LINE, FETCH,
        EVICT, BYPASS, DUPLICATE)."""
        self.clock += 1
        R, n = req.shape
        W, device = self.ways, req.device
        earlier = torch.ones(n, n, dtype=torch.bool, device=device).tril(-1)  # [j, i]: lane i before lane j
        dup = ((req[:, :, None] == req[:, None, :]) & earlier).any(-1)  # the slot came in an earlier lane
        sets = req % self.sets
        base = (torch.arange(R, device=device)[:, None] * self.sets + sets) * W  # [R, n]: the set's first line
        ways = torch.arange(W, device=device)
        tags = self._tags_flat[base[..., None] + ways]  # [R, n, W]
        match = tags == req[..., None]
        hit = match.any(-1)
        hit_way = match.int().argmax(-1)
        live_hit = hit & ~dup
        miss = ~hit & ~dup
        same_set = sets[:, :, None] == sets[:, None, :]  # [R, j, i]
        # The lines of lane j's set that this token's hits claim: [R, n, W].
        claimed = (same_set[..., None] & live_hit[:, None, :, None]
                   & (hit_way[:, None, :, None] == ways)).any(2)
        big = torch.iinfo(torch.long).max
        rank = self._last_flat[base[..., None] + ways].long()
        if self.policy == "lfu":
            rank = self._count_flat[base[..., None] + ways] * (1 << 32) + rank
        score = torch.where(claimed, big, torch.where(tags < 0, -1, rank))
        ordered, order = torch.sort(score, dim=-1, stable=True)  # ties: the lowest way first
        nth = (same_set & miss[:, None, :] & earlier).sum(-1)  # the misses before lane j in its set
        pick = nth.clamp(max=W - 1)[..., None]
        taken = miss & (nth < W) & (ordered.gather(-1, pick)[..., 0] != big)
        way = torch.where(hit, hit_way, order.gather(-1, pick)[..., 0])
        line = base + way
        old_tag = tags.gather(-1, way[..., None])[..., 0].long()
        evict = taken & self._dirty_flat[line] & (old_tag >= 0)
        in_line = hit | taken  # a duplicate lane of a hit or a fetch: the same line
        # The metadata of the lines claimed (hits) and taken (misses); the rest into the scratch line.
        scratch = self._lines
        self._last_flat[torch.where(live_hit | taken, line, scratch)] = self.clock.to(self._tag_type)
        at_taken = torch.where(taken, line, scratch)
        self._tags_flat[at_taken] = req.to(self._tag_type)
        self._dirty_flat[at_taken] = False
        if self.policy == "lfu":
            self._count_flat.index_put_((torch.where(live_hit, line, scratch),), torch.ones_like(line), accumulate=True)
            self._count_flat[at_taken] = 1
        bypass = miss & ~taken
        self._counts += torch.stack([(~dup).sum(), live_hit.sum(), miss.sum(), bypass.sum(), evict.sum(),
                                     taken.sum()])
        rows = torch.arange(R, device=device)[:, None]
        flags = (in_line.long() * IN_LINE + taken.long() * FETCH + evict.long() * EVICT + bypass.long() * BYPASS
                 + dup.long() * DUPLICATE)
        return line, self._host_index(rows, req), self._host_index(rows, old_tag.clamp(min=0)), flags

    def begin_token(self, write_idx: torch.Tensor, read_idx: torch.Tensor) -> None:
        line, host_row, evict_row, flags = self._plan(torch.cat([write_idx, read_idx], dim=1))
        # The torch path: one copy back (the dirty victims), one copy in (the missed rows).
        evict, fetch = (flags & EVICT) != 0, (flags & FETCH) != 0
        if bool(evict.any()):
            self._to_host(evict_row[evict], self._data_flat[line[evict]])
        if bool(fetch.any()):
            self._data_flat[line[fetch]] = self._host_rows(host_row[fetch])

    # -- the kernel step's rows (SlotStore._kernel_step): the plan, then the rows moved by two kernels ----
    def _table(self, slots: torch.Tensor) -> torch.Tensor:
        import triton

        from .offload_kernels import plan_fill_kernel

        pad = triton.next_power_of_2
        rows, n = slots.shape
        width = self.d_v + 1
        table = torch.empty(rows, n, width, dtype=self.dtype, device=self.device)
        line, host_row, flags = (torch.empty(rows, n, dtype=torch.long, device=self.device) for _ in range(3))
        lfu = self.policy == "lfu"
        # The plan runs at clock + 1; step_store_kernel, launched after it, advances the clock (no launch of its
        # own for `clock += 1`).
        plan_fill_kernel[(rows,)](
            slots, self._tags_flat, self._last_flat, self._count_flat if lfu else self._last_flat,
            self._dirty_flat.view(torch.uint8), self._counts, self._data_flat, self.host, table, line, host_row, flags,
            self.clock, self.memory_slots, N=n, N_PAD=pad(n), SETS=self.sets, W=self.ways,
            W_PAD=max(2, pad(self.ways)), LFU=lfu, ROW=width, COLS=pad(width), num_warps=PLAN_WARPS,
        )
        self._moves = (line, host_row, flags)
        return table

    def _step_table(self, table, slots, write_w, decay, v, read_w, eps: float, launch, out_dtype) -> torch.Tensor:
        import triton

        from ..ops.ram.step import EXACT_ROUNDING
        from .offload_kernels import step_store_kernel

        line, host_row, flags = self._moves
        rows, d_v = v.shape
        o = torch.empty(rows, d_v, dtype=out_dtype, device=v.device)
        k_pad, block_dv, num_warps = launch  # the dense step's tiles: its bits
        step_store_kernel[(rows,)](
            table, slots, write_w, decay, v, read_w, o, self.offset, self.heads, float(eps), self._data_flat,
            self.host, self._dirty_flat.view(torch.uint8), line, host_row, flags, self.clock,
            K=write_w.shape[1], K_PAD=k_pad, D_V=d_v, BLOCK_DV=block_dv, COLS=triton.next_power_of_2(d_v + 1),
            num_warps=num_warps, **EXACT_ROUNDING,
        )
        return o

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        hit, sets, way, rows = self._lookup(slots)
        out = self.data[rows, sets, way]
        if not bool(hit.all()):  # bypassed slots: from the host
            out[~hit] = self._host_rows(self._host_index(rows[~hit], slots[~hit]))
        return out

    def scatter(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        hit, sets, way, rows = self._lookup(slots)
        self.data[rows[hit], sets[hit], way[hit]] = values[hit]
        self.dirty[rows[hit], sets[hit], way[hit]] = True
        if not bool(hit.all()):
            self._to_host(self._host_index(rows[~hit], slots[~hit]), values[~hit])

    # -- what it holds ----------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write every dirty line back to the host (the lines stay, clean)."""
        r, s, w = self.dirty.nonzero(as_tuple=True)
        if len(r):
            self._to_host(self._host_index(r, self.tags[r, s, w]), self.data[r, s, w])
            self.dirty.zero_()

    def to_dense(self) -> RAMState:
        self.flush()
        table = self.host.to(self.device).view(self.batch, self.heads, self.memory_slots, self.d_v + 1)
        return RAMState(table[..., : self.d_v].contiguous(), table[..., self.d_v].contiguous(), self.offset.clone())

    def load_dense(self, state: RAMState) -> None:
        batch, heads, memory_slots, d_v = state.S.shape
        if not self.allocated or self.batch != batch:
            self.allocate(batch, heads, memory_slots, d_v, state.S.dtype, state.S.device)
        table = torch.cat([state.S, state.z[..., None]], dim=-1).reshape(-1, d_v + 1)
        self.host.copy_(table)
        self.tags.fill_(-1)
        self.dirty.zero_()
        self.offset = state.offset.clone()
        self.tokens = int(state.offset.max()) if len(state.offset) else 0

    def device_bytes(self) -> int:
        """The cache: rows, tags, ranks and dirty bits (the offsets besides)."""
        tensors = (self._data_flat, self._tags_flat, self._last_flat, self._count_flat, self._dirty_flat)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def host_bytes(self) -> int:
        return self.host.numel() * self.host.element_size()

    def hit_rate(self) -> float:
        return self.stats["hits"] / max(1, self.stats["accesses"])

    def map_batch(self, fn) -> None:
        self.flush()
        host = self.host.view(self.batch, self.heads * self.memory_slots, self.d_v + 1)
        dense = fn(host.to(self.device)).view(-1, self.heads, self.memory_slots, self.d_v + 1)
        offset, tokens = fn(self.offset), self.tokens
        self.load_dense(RAMState(dense[..., : self.d_v], dense[..., self.d_v], offset))
        self.tokens = tokens


def dense_state_fraction(store: OffloadState) -> float:
    """The cache's device bytes against the dense state's ``B * H * M * (d_v + 1)`` floats (``budget`` bounds it)."""
    row_bytes = (store.d_v + 1) * torch.empty(0, dtype=store.dtype).element_size()
    dense = store.batch * store.heads * store.memory_slots * row_bytes
    return store.device_bytes() / dense


__all__ = ["OffloadState", "POLICIES", "dense_state_fraction"]
