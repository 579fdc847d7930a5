"""The sparse state: only the slots that have been written are stored.

Per (sequence, head) row ``r = b * H + h`` a map from slot id to a row of a pool ``[capacity, d_v + 1]``
(``[S, z]``), kept as one sorted tensor of keys ``r * M + slot`` beside the pool index of each key, looked
up with ``torch.searchsorted``: vectorised over the batch and heads, on the CPU or a GPU, and independent
of M (M may be 2**40: nothing M-sized is ever built). A slot that was never written reads as the empty
row ``[0, 1/M]`` (``RAMState.empty``'s), so reads insert nothing: only writes add keys, and a sequence of T
tokens stores at most ``min(M, T * K)`` rows per head. The pool grows as keys come (by a quarter, or what
one token needs) and never beyond that bound, so the memory is at most ``B * H * min(M, T * K)`` rows of
``d_v + 1`` floats, plus one int64 key and one index per stored row.

Inserting keys re-sorts them, and finding how many are new reads the device on the host: a step of the
sparse state cannot be captured in a CUDA graph (the dense state's can).
"""

from __future__ import annotations

import torch

from ..ops.ram.state import RAMState
from .base import SlotStore


# The most rows (B * H * M) whose dense form map_batch builds: 2**27 rows of d_v + 1 floats.
DENSE_FORM_MAX_ROWS = 2**27


class SparseState(SlotStore):
    """Only the touched slots of every (sequence, head): see the module docstring."""

    kind = "sparse"

    def _allocate(self) -> None:
        rows = self.batch * self.heads
        if rows * self.memory_slots > torch.iinfo(torch.int64).max:
            raise ValueError(f"the sparse state keys (sequence, head, slot) as one int64: B * H * M = {rows} * "
                             f"{self.memory_slots} does not fit")
        self.keys = torch.empty(0, dtype=torch.long, device=self.device)  # sorted
        self.index = torch.empty(0, dtype=torch.long, device=self.device)  # pool row of each key
        self.pool = torch.empty(0, self.d_v + 1, dtype=self.dtype, device=self.device)
        self.used = 0  # pool rows in use (= len(keys))

    # -- the map ----------------------------------------------------------------------------------------
    def _keys_of(self, slots: torch.Tensor) -> torch.Tensor:
        row = torch.arange(slots.shape[0], device=slots.device)[:, None]
        return row * self.memory_slots + slots

    def _find(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(found, pool row)`` of each key (the pool row is 0 where not found)."""
        if len(self.keys) == 0:
            return torch.zeros_like(keys, dtype=torch.bool), torch.zeros_like(keys)
        pos = torch.searchsorted(self.keys, keys).clamp_(max=len(self.keys) - 1)
        found = self.keys[pos] == keys
        return found, torch.where(found, self.index[pos], 0)

    def _insert(self, keys: torch.Tensor) -> None:
        """Add the distinct ``keys [n]`` (none stored yet), with empty rows."""
        n = len(keys)
        if n == 0:
            return
        need = self.used + n
        if need > len(self.pool):
            bound = self.batch * self.heads * min(self.memory_slots, (self.tokens + 1) * self._topk)
            capacity = max(need, min(bound, len(self.pool) + len(self.pool) // 4))
            pool = torch.empty(capacity, self.d_v + 1, dtype=self.dtype, device=self.device)
            pool[: self.used] = self.pool[: self.used]
            self.pool = pool
        self.pool[self.used:need] = 0
        self.pool[self.used:need, self.d_v] = self.empty_z
        index = torch.arange(self.used, need, device=self.device)
        keys, order = torch.sort(torch.cat([self.keys, keys]))
        self.keys, self.index = keys, torch.cat([self.index, index])[order]
        self.used = need

    # -- SlotStore --------------------------------------------------------------------------------------
    def begin_token(self, write_idx: torch.Tensor, read_idx: torch.Tensor) -> None:
        self._topk = write_idx.shape[1]
        keys = self._keys_of(write_idx).reshape(-1)  # distinct: a token's K write slots are
        found, _ = self._find(keys)
        self._insert(keys[~found])

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        found, at = self._find(self._keys_of(slots))
        rows = self.pool[at] if self.used else self.empty_rows(*slots.shape)
        return torch.where(found[..., None], rows, self.empty_rows(1, 1)[0])

    def scatter(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        found, at = self._find(self._keys_of(slots))  # every written slot was inserted by begin_token
        self.pool[at.reshape(-1)] = values.reshape(-1, self.d_v + 1)

    def load_dense(self, state: RAMState) -> None:
        """Store the rows of ``state`` that differ from the empty row."""
        batch, heads, memory_slots, d_v = state.S.shape
        if not self.allocated:
            self.allocate(batch, heads, memory_slots, d_v, state.S.dtype, state.S.device)
        table = torch.cat([state.S, state.z[..., None]], dim=-1).reshape(batch * heads * memory_slots, d_v + 1)
        touched = (state.S != 0).any(-1).reshape(-1) | (state.z != self.empty_z).reshape(-1)
        keys = touched.nonzero()[:, 0]
        self.keys, self.index = keys, torch.arange(len(keys), device=keys.device)
        self.pool, self.used = table[keys].clone(), len(keys)
        self.offset = state.offset.clone()
        self.tokens = int(state.offset.max()) if len(state.offset) else 0
        self._topk = 1

    def to_dense(self) -> RAMState:
        rows = self.batch * self.heads * self.memory_slots
        table = torch.zeros(rows, self.d_v + 1, dtype=self.dtype, device=self.device)
        table[:, self.d_v] = self.empty_z
        table[self.keys] = self.pool[self.index]
        table = table.view(self.batch, self.heads, self.memory_slots, self.d_v + 1)
        return RAMState(table[..., : self.d_v].contiguous(), table[..., self.d_v].contiguous(), self.offset.clone())

    def stored_rows(self) -> torch.Tensor:
        """Rows stored per (sequence, head), ``[B, H]``."""
        counts = torch.bincount(self.keys // self.memory_slots, minlength=self.batch * self.heads)
        return counts.view(self.batch, self.heads)

    def device_bytes(self) -> int:
        """The pool as allocated, plus the keys and their pool indices."""
        return (self.pool.numel() * self.pool.element_size() + self.keys.numel() * 8 + self.index.numel() * 8)

    def map_batch(self, fn) -> None:
        # Batch changes and beam reordering go through the dense form: fine for the M the tests use, and
        # refused for an M that has no dense form.
        if self.batch * self.heads * self.memory_slots > DENSE_FORM_MAX_ROWS:
            raise ValueError(f"the sparse state changes or reorders the batch (beam search) through its dense form, "
                             f"and B * H * M = {self.batch * self.heads * self.memory_slots} rows is too many "
                             f"(at most {DENSE_FORM_MAX_ROWS}): decode with num_beams=1, or the dense state")
        dense = self.to_dense()
        dense = RAMState(*(fn(t) for t in dense))
        self.allocated = False
        self.load_dense(dense)


__all__ = ["SparseState"]
