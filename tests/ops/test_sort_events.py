"""sort_events: a stable sort by (sequence, slot) whatever integer type the combined key needs."""

import pytest
import torch

from ramnet.ops.ram.events import sort_events


@pytest.mark.parametrize("memory_slots", [9, 2**20, 2**40, 2**62])  # int16, int32, int64 keys; 3 x 2**62: two sorts
@pytest.mark.parametrize("with_seq", [False, True])
def test_matches_a_lexicographic_reference(memory_slots, with_seq):
    gen = torch.Generator().manual_seed(memory_slots % 1000 + with_seq)
    rows, events, num_seqs = 3, 40, 3
    # Few distinct slots near the top of the range, so that ties (stability) and the top bits matter.
    slots = memory_slots - 1 - torch.randint(0, 4, (rows, events), generator=gen)
    event_seq = torch.sort(torch.randint(0, num_seqs, (events,), generator=gen)).values.expand(rows, -1)
    sorted_slots, perm, start = sort_events(slots, event_seq if with_seq else None, memory_slots, num_seqs)

    seq = event_seq if with_seq else torch.zeros_like(slots)
    for r in range(rows):
        # Python's sort is stable: (sequence, slot), then original position.
        want = sorted(range(events), key=lambda e: (int(seq[r, e]), int(slots[r, e])))
        assert perm[r].tolist() == want
        assert sorted_slots[r].tolist() == [int(slots[r, e]) for e in want]
        keys = [(int(seq[r, e]), int(slots[r, e])) for e in want]
        assert start[r].tolist() == [i == 0 or keys[i] != keys[i - 1] for i in range(events)]
