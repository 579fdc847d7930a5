"""The host-resident state: the whole memory in host memory, a cache of C hot slots per (sequence, head)
on the device.

- Host: the rows ``[S, z]`` of every (sequence, head, slot), ``[B * H * M, d_v + 1]``, on ``host_device``
  (the CPU; pinned when the compute device is CUDA, so that copies can be asynchronous).
- Device: per (sequence, head) a set-associative cache of ``sets x ways`` lines (``C = sets * ways`` slots;
  slot m goes to set ``m % sets``), each with its slot tag, its row, a dirty bit and what the policy ranks
  it by: the last use (LRU) or the use count, ties to the least recently used (LFU).

Before each token's step, ``begin_token`` makes its K write and K read slots resident: hits are claimed
first, then each miss takes the set's lowest-ranked line that this token has not claimed. All the dirty
victims of the step go back to the host in one copy and all the missed rows come in one copy, so a step
waits for at most one transfer each way, whatever the number of misses in the batch. A slot whose set is
full of this token's own slots (more than ``ways`` of its 2K slots in one set) is read and written on the
host directly (a bypass, counted). Then the step reads and writes the cache's rows: the same arithmetic as
the dense state (``SlotStore``), so the outputs are the same.

On CUDA the row copies go through pinned host memory on a side stream; finding the missed rows needs their
slot ids on the host, one device read per step and layer, so a step of this state is not CUDA-graph
capturable (the dense state's is). That path is written for CUDA but has only been run on the CPU here,
where "host" and "device" are the same memory and the cache logic is exercised as it is.

The prompt (``prefill="dense"``, the default) goes through the op as for the dense state and its final
state is moved to the host with an empty cache: one layer's dense state exists on the device at a time.
``prefill="stream"`` runs the prompt token by token through the cache instead.

Prefetch: none. The next token's slots depend on its key and query, i.e. on the layer's input at that
token, which is not known before the previous layers have run; what could be prefetched is a guess (e.g.
CAPE's shift of the last slots), which the traces do not support (docs/trace.md).
"""

from __future__ import annotations

import torch

from ..ops.checks import check_choice, check_int, check_positive
from ..ops.ram.state import RAMState
from .base import SlotStore

POLICIES = ("lru", "lfu")
DEFAULT_BUDGET = 0.1
# LFU: on the trained tiny checkpoint's traces its hit rate is above LRU's at every budget (docs/trace.md):
# RAM-Net's slots are hot by frequency (a few slots per head are chosen again and again), not by recency.
DEFAULT_POLICY = "lfu"


class OffloadState(SlotStore):
    """See the module docstring. ``budget``: the cache's device memory as a fraction of the dense state's
    (its lines' tags, ranks and dirty bits counted, so a little under ``budget * M`` slots per (sequence,
    head)); ``slots``: the slots per (sequence, head) instead; ``ways``: lines per set (default: fully associative up to 64 slots,
    else 16 ways); ``policy``: ``"lfu"`` (the default: the traces of the tiny checkpoint favour it,
    docs/trace.md) or ``"lru"``."""

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
        self.stats = dict(accesses=0, hits=0, misses=0, bypasses=0, writebacks=0, fetched_rows=0)

    # -- allocation -------------------------------------------------------------------------------------
    def _allocate(self) -> None:
        M = self.memory_slots
        # Slot tags and last uses in int32 where they fit; use counts for LFU only.
        self._tag_type = torch.int32 if M <= torch.iinfo(torch.int32).max else torch.long
        row_bytes = (self.d_v + 1) * torch.empty(0, dtype=self.dtype).element_size()
        line_bytes = row_bytes + 2 * torch.empty(0, dtype=self._tag_type).element_size() + 1 + (
            8 if self.policy == "lfu" else 0)
        if self.slots is not None:
            capacity = self.slots
        else:  # the budget is a fraction of the dense state's bytes: the lines' metadata counts
            capacity = max(1, int(self.budget * M * row_bytes / line_bytes))
        capacity = min(capacity, M)
        ways = self.ways_option or (capacity if capacity <= 64 else 16)
        ways = min(ways, capacity)
        self.sets = max(1, capacity // ways)
        self.ways = ways
        self.capacity = self.sets * self.ways
        rows = self.batch * self.heads
        pin = self.device.type == "cuda" and self.host_device.type == "cpu"
        self.host = torch.zeros(rows * M, self.d_v + 1, dtype=self.dtype, device=self.host_device, pin_memory=pin)
        self.host[:, self.d_v] = self.empty_z
        shape = (rows, self.sets, self.ways)
        self.tags = torch.full(shape, -1, dtype=self._tag_type, device=self.device)
        self.last = torch.zeros(shape, dtype=self._tag_type, device=self.device)
        self.count = torch.zeros(shape if self.policy == "lfu" else (0,), dtype=torch.long, device=self.device)
        self.dirty = torch.zeros(shape, dtype=torch.bool, device=self.device)
        self.data = torch.zeros(*shape, self.d_v + 1, dtype=self.dtype, device=self.device)
        self.clock = 0
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
    def _rank(self) -> torch.Tensor:
        """What eviction minimises: the last use (LRU), or the count then the last use (LFU)."""
        if self.policy == "lru":
            return self.last
        return self.count * (1 << 32) + self.last

    def _lookup(self, slots: torch.Tensor):
        """``(hit, set, way, row)`` of ``slots [R, n]``, each ``[R, n]`` (``row``: the (sequence, head) row)."""
        sets = slots % self.sets
        rows = torch.arange(slots.shape[0], device=slots.device)[:, None].expand_as(slots)
        match = self.tags[rows, sets] == slots[..., None]  # [R, n, ways]
        return match.any(-1), sets, match.int().argmax(-1), rows

    def begin_token(self, write_idx: torch.Tensor, read_idx: torch.Tensor) -> None:
        self.clock += 1
        now = self.clock
        req = torch.cat([write_idx, read_idx], dim=1)  # [R, 2K]
        n = req.shape[1]
        earlier = torch.ones(n, n, dtype=torch.bool, device=req.device).tril(-1)
        dup = ((req[:, :, None] == req[:, None, :]) & earlier).any(-1)  # the slot came in an earlier lane
        hit, sets, way, rows = self._lookup(req)
        hit_lanes = hit & ~dup
        # Claim the hits: their lines are this token's, and are ranked as just used.
        claimed = torch.zeros_like(self.dirty)
        h_r, h_s, h_w = rows[hit_lanes], sets[hit_lanes], way[hit_lanes]
        claimed[h_r, h_s, h_w] = True
        self.last[h_r, h_s, h_w] = now
        if self.policy == "lfu":
            self.count[h_r, h_s, h_w] += 1
        miss = ~hit & ~dup
        accesses = int((~dup).sum())
        n_miss = int(miss.sum())
        self.stats["accesses"] += accesses
        self.stats["hits"] += accesses - n_miss
        self.stats["misses"] += n_miss
        if n_miss == 0:
            return
        # Each missed lane, in order, takes the lowest-ranked unclaimed line of its set: metadata only, on
        # whole columns of lanes (no host read in the loop; lanes that are not misses change nothing).
        R = req.shape[0]
        ar = torch.arange(R, device=req.device)
        victims = torch.zeros_like(req)
        taken = torch.zeros_like(miss)  # the missed lane got a line
        evict = torch.zeros_like(miss)  # ... whose old slot was dirty: written back
        evict_tag = torch.zeros_like(req)
        big = torch.iinfo(torch.long).max
        for j in range(n):
            s = sets[:, j]
            tags = self.tags[ar, s]  # [R, ways]
            score = torch.where(claimed[ar, s], big, torch.where(tags < 0, -1, self._rank()[ar, s].long()))
            victim = score.argmin(-1)
            # else every line of the set is this token's: the lane bypasses the cache
            ok = miss[:, j] & (score.gather(-1, victim[:, None])[:, 0] != big)
            old = tags.gather(-1, victim[:, None])[:, 0]
            victims[:, j], taken[:, j], evict_tag[:, j] = victim, ok, old.long()
            evict[:, j] = ok & self.dirty[ar, s, victim] & (old >= 0)
            self.tags[ar, s, victim] = torch.where(ok, req[:, j].to(self._tag_type), old)
            self.dirty[ar, s, victim] &= ~ok
            self.last[ar, s, victim] = torch.where(ok, now, self.last[ar, s, victim])
            if self.policy == "lfu":
                self.count[ar, s, victim] = torch.where(ok, 1, self.count[ar, s, victim])
            claimed[ar, s, victim] |= ok
        self.stats["bypasses"] += int((miss & ~taken).sum())
        # One copy back (the dirty victims), one copy in (the missed rows).
        lanes = ar[:, None].expand_as(req)
        if bool(evict.any()):
            e_r, e_s, e_w = lanes[evict], sets[evict], victims[evict]
            self._to_host(self._host_index(e_r, evict_tag[evict]), self.data[e_r, e_s, e_w])
            self.stats["writebacks"] += len(e_r)
        f_r, f_s, f_w = lanes[taken], sets[taken], victims[taken]
        if len(f_r):
            self.data[f_r, f_s, f_w] = self._host_rows(self._host_index(f_r, req[taken]))
            self.stats["fetched_rows"] += len(f_r)

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
        return sum(t.numel() * t.element_size() for t in (self.data, self.tags, self.last, self.count, self.dirty))

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
    dense = store.batch * store.heads * store.memory_slots * (store.d_v + 1) * torch.empty(0, dtype=store.dtype).element_size()
    return store.device_bytes() / dense


__all__ = ["OffloadState", "POLICIES", "dense_state_fraction"]
