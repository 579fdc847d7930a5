"""Locality of a trace: reuse distances and the hit rates of slot caches, per (sequence, head).

The access stream of one (sequence, head) is what a decoding step needs resident, token after token:
the token's K write slots (read, updated and written back) and then its K read slots, each slot once
per token (a read of a slot the token has just written is part of the same access). So one token makes
between K and 2K accesses.

- Reuse (stack) distance of an access: the number of distinct other slots accessed since the previous
  access to the same slot; a first access is cold (distance infinite). An LRU cache of C slots hits
  exactly the accesses of distance < C (Mattson et al., 1970), so one pass gives the LRU hit rate at
  every cache size.
- LFU (in-cache frequency counts, ties evicting the least recently used) is simulated per size.
- ``belady`` (evict the slot next needed furthest in the future) is the offline optimum: an upper bound
  for any cache of that size.

Hit rates count cold misses as misses.
"""

from __future__ import annotations

import heapq

import numpy as np


def access_stream(write_idx: np.ndarray, read_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(slots, token)`` of the accesses of one (sequence, head) from ``write_idx, read_idx [T, K]``:
    per token its write slots, then its read slots not among them, in lane order."""
    slots, tokens = [], []
    for t, (w, r) in enumerate(zip(write_idx.tolist(), read_idx.tolist())):
        seen = []
        for s in w + r:
            if s not in seen:
                seen.append(s)
        slots += seen
        tokens += [t] * len(seen)
    return np.asarray(slots, dtype=np.int64), np.asarray(tokens, dtype=np.int64)


def stack_distances(slots: np.ndarray) -> np.ndarray:
    """The reuse distance of every access of ``slots [N]`` (-1 for a cold access), in O(N log N): a
    Fenwick tree over time holds a 1 at each slot's latest access, so the distinct slots since the
    previous access of ``s`` at time p are the ones between p and now."""
    n = len(slots)
    tree = np.zeros(n + 1, dtype=np.int64)
    last: dict[int, int] = {}
    out = np.full(n, -1, dtype=np.int64)

    def add(i, delta):
        i += 1
        while i <= n:
            tree[i] += delta
            i += i & -i

    def prefix(i):  # sum of [0, i)
        total = 0
        while i > 0:
            total += tree[i]
            i -= i & -i
        return total

    live = 0  # ones in the tree
    for i, s in enumerate(slots.tolist()):
        p = last.get(s)
        if p is not None:
            out[i] = live - prefix(p + 1)  # latest accesses after p
            add(p, -1)
            live -= 1
        add(i, 1)
        live += 1
        last[s] = i
    return out


def lru_hit_rates(distances: np.ndarray, sizes: list[int]) -> list[float]:
    """The LRU hit rate at each cache size (slots) from the stream's ``stack_distances``."""
    if len(distances) == 0:
        return [0.0 for _ in sizes]
    warm = distances[distances >= 0]
    return [float((warm < c).sum() / len(distances)) for c in sizes]


def lfu_hit_rate(slots: np.ndarray, size: int) -> float:
    """The hit rate of an LFU cache of ``size`` slots (counts of the slots in the cache; an evicted
    slot starts again from one; among equal counts the least recently used goes first)."""
    if len(slots) == 0 or size <= 0:
        return 0.0
    count: dict[int, int] = {}
    used: dict[int, int] = {}
    heap: list[tuple[int, int, int]] = []  # (count, last use, slot); stale entries are skipped
    hits = 0
    for i, s in enumerate(slots.tolist()):
        if s in count:
            hits += 1
            count[s] += 1
        else:
            if len(count) >= size:
                while True:
                    c, u, victim = heapq.heappop(heap)
                    if count.get(victim) == c and used[victim] == u:
                        break
                del count[victim], used[victim]
            count[s] = 1
        used[s] = i
        heapq.heappush(heap, (count[s], i, s))
    return hits / len(slots)


def belady_hit_rate(slots: np.ndarray, size: int) -> float:
    """The hit rate of the offline optimum (Belady's MIN: evict the slot next used furthest ahead)."""
    n = len(slots)
    if n == 0 or size <= 0:
        return 0.0
    seq = slots.tolist()
    next_use = [n] * n
    upcoming: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        next_use[i] = upcoming.get(seq[i], n + i)  # never again: distinct "infinities", latest first out
        upcoming[seq[i]] = i
    resident: dict[int, int] = {}  # slot -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, slot)
    hits = 0
    for i, s in enumerate(seq):
        if s in resident:
            hits += 1
        elif len(resident) >= size:
            while True:
                nu, victim = heapq.heappop(heap)
                if resident.get(victim) == -nu:
                    break
            del resident[victim]
        resident[s] = next_use[i]
        heapq.heappush(heap, (-next_use[i], s))
    return hits / n


def cache_sizes(memory_slots: int, fractions: list[float]) -> list[int]:
    """Slots per head of each budget (a fraction of M), at least one."""
    return [max(1, int(round(f * memory_slots))) for f in fractions]


def predicted_by_last_token(slots: np.ndarray, tokens: np.ndarray, memory_slots: int, cape: bool) -> np.ndarray:
    """``[N]`` bool: the access's slot was among the previous token's slots, or (a CAPE head) among them
    shifted by one position (CAPE moves a slot chosen at t to ``(j - t) mod M``, so a repeated choice moves
    by -1 a token): what a prefetch from the last token could have fetched ahead."""
    out = np.zeros(len(slots), dtype=bool)
    prev: set[int] = set()
    current: set[int] = set()
    t_now = -1
    for i, (s, t) in enumerate(zip(slots.tolist(), tokens.tolist())):
        if t != t_now:
            prev, current, t_now = current, set(), t
            if cape:
                prev = prev | {(p - 1) % memory_slots for p in prev}
        out[i] = s in prev
        current.add(s)
    return out


def lru_prefetch(slots: np.ndarray, tokens: np.ndarray, size: int, memory_slots: int, cape: bool) -> dict:
    """An LRU cache of ``size`` slots that, before each token's accesses, fetches the last token's slots
    (on a CAPE head shifted by one only: unshifted they were just used, so resident unless the cache is smaller
    than a token's slots; ``predicted_by_last_token`` counts both) that are not resident, as the most
    recently used (evicting as a miss does): what a prefetch from the last token buys, pollution included.
    ``hit_rate``: hits over all accesses (a hit on a prefetched slot counts); ``fetched_per_token``: the rows
    prefetched per token; ``used``: the share of them accessed before they were evicted."""
    from collections import OrderedDict

    cache: OrderedDict[int, bool] = OrderedDict()  # slot -> prefetched and not yet used; the last is the newest
    hits = fetched = used = 0
    prev: list[int] = []
    current: list[int] = []
    t_now = -1

    def insert(slot: int, prefetched: bool) -> None:
        if len(cache) >= size:
            cache.popitem(last=False)
        cache[slot] = prefetched

    for s, t in zip(slots.tolist(), tokens.tolist()):
        if t != t_now:  # a new token: prefetch what the last one predicts
            prev, current, t_now = current, [], t
            for p in prev:
                p = (p - 1) % memory_slots if cape else p
                if p not in cache:
                    insert(p, True)
                    fetched += 1
        current.append(s)
        if s in cache:
            hits += 1
            used += cache[s]
            cache[s] = False
            cache.move_to_end(s)
        else:
            insert(s, False)
    n_tokens = len(set(tokens.tolist()))
    return dict(hit_rate=hits / max(1, len(slots)), fetched_per_token=fetched / max(1, n_tokens),
                used=used / fetched if fetched else None)


def summarize_head(write_idx: np.ndarray, read_idx: np.ndarray, memory_slots: int, fractions: list[float],
                   policies: tuple[str, ...] = ("lru", "lfu", "belady"), cape: bool = False) -> dict:
    """Locality of one (sequence, head): ``write_idx, read_idx [T, K]`` (``cape``: the head shifts its slots).

    ``prefetch``: per cache size, the fraction of all accesses that miss in the LRU cache but were among
    the previous token's slots (shifted by one on a CAPE head): the most a prefetch from the last token
    could turn into hits (``predicted_by_last_token``), an upper bound; ``lru_prefetch``: per cache size, the
    LRU cache with that prefetch simulated (``lru_prefetch``: its hit rate, rows fetched ahead per token and
    the share of them used)."""
    slots, tokens = access_stream(write_idx, read_idx)
    distances = stack_distances(slots)
    predicted = predicted_by_last_token(slots, tokens, memory_slots, cape)
    warm = distances[distances >= 0]
    sizes = cache_sizes(memory_slots, fractions)
    out = dict(
        tokens=int(write_idx.shape[0]),
        accesses=int(len(slots)),
        distinct_slots=int(len(np.unique(slots))),
        touched_fraction=float(len(np.unique(slots)) / memory_slots),
        cold_fraction=float((distances < 0).mean()) if len(slots) else 0.0,
        reuse_distance=dict(
            median=float(np.median(warm)) if len(warm) else None,
            p90=float(np.percentile(warm, 90)) if len(warm) else None,
            mean=float(warm.mean()) if len(warm) else None,
        ),
        cache_slots=sizes,
        hit_rate={},
    )
    if "lru" in policies:
        out["hit_rate"]["lru"] = lru_hit_rates(distances, sizes)
    miss = [(distances < 0) | (distances >= c) for c in sizes]
    out["prefetch"] = [float((m & predicted).mean()) if len(slots) else 0.0 for m in miss]
    out["lru_prefetch"] = [lru_prefetch(slots, tokens, c, memory_slots, cape) for c in sizes]
    if "lfu" in policies:
        out["hit_rate"]["lfu"] = [lfu_hit_rate(slots, c) for c in sizes]
    if "belady" in policies:
        out["hit_rate"]["belady"] = [belady_hit_rate(slots, c) for c in sizes]
    return out


def reuse_histogram(distances: np.ndarray, memory_slots: int) -> dict:
    """Counts of reuse distances in power-of-two bins ``[0, 1), [1, 2), [2, 4), ...`` up to M, and cold."""
    edges = [0, 1]
    while edges[-1] < memory_slots:
        edges.append(edges[-1] * 2)
    warm = distances[distances >= 0]
    counts, _ = np.histogram(warm, bins=edges + [max(edges[-1] + 1, int(warm.max()) + 2 if len(warm) else 1)])
    return dict(edges=edges, counts=counts.tolist(), cold=int((distances < 0).sum()))


__all__ = ["access_stream", "belady_hit_rate", "cache_sizes", "lfu_hit_rate", "lru_hit_rates", "lru_prefetch",
           "predicted_by_last_token", "reuse_histogram", "stack_distances", "summarize_head"]
