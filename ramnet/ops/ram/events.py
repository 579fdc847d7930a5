"""The slot-sorted event stream of the segment paths (parallel and Triton) and the flat state rows
they read and write.

Per (batch row, head), every token makes K write events and K read events, laid out ``[T, 2K]``
(K writes then K reads per step). Sorting them by (sequence, slot) with a stable sort keeps them in
time order inside each slot, writes before reads of the same step. The paths keep the state of
all sequences as one table of rows ``[N * H * M, d_v + 1]``: ``[S, z]`` of each (sequence, head,
slot).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import decode_tokens, num_sequences
from .spec import RAMSpec
from .state import RAMState


def token_positions(batch: int, seq_len: int, offset: torch.Tensor, cu_seqlens: torch.Tensor | None):
    """Sequence id ``[B, T]`` and absolute position ``[B, T]`` of every token.

    Without ``cu_seqlens`` sequence b is batch row b; with it (B = 1) tokens are packed and each
    sequence counts positions from its own start, continuing from ``offset``.
    """
    t = torch.arange(seq_len, device=offset.device)
    if cu_seqlens is None:
        seq = torch.arange(batch, device=offset.device)[:, None].expand(batch, seq_len)
        return seq, offset[:, None] + t
    seq = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1, device=offset.device), cu_seqlens.diff())[None]
    return seq, t - cu_seqlens[seq] + offset[seq]


def by_row(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, H, ...] -> [B*H, T, ...]``: one row per (batch row, head)."""
    batch, seq_len, heads = x.shape[:3]
    return x.transpose(1, 2).reshape(batch * heads, seq_len, *x.shape[3:])


def sort_events(slots: torch.Tensor, event_seq: torch.Tensor | None, memory_slots: int, num_seqs: int):
    """Stable sort of event slots ``[R, E]`` by (sequence, slot). Returns the sorted slots (in the
    key's integer type: index arithmetic with int64 tensors promotes), the permutation and a flag
    marking where a new (sequence, slot) segment starts.

    One sort of a combined key ``sequence * M + slot`` in the narrowest integer type that holds it:
    a radix sort then makes fewer passes (int16 for the paper's M = 1024). When the combined key
    would not fit in int64 (M x sequences > 2**63, e.g. M = 2**62 and 3 packed sequences), two stable
    sorts instead, by slot and then by sequence, which order the events the same way."""
    key_range = memory_slots * (num_seqs if event_seq is not None else 1)
    if key_range > torch.iinfo(torch.int64).max + 1:
        return _sort_lexicographic(slots, event_seq)
    key_type = next(t for t in (torch.int16, torch.int32, torch.int64) if key_range <= torch.iinfo(t).max + 1)
    key = slots if event_seq is None else event_seq * memory_slots + slots
    sorted_key, perm = torch.sort(key.to(key_type), dim=-1, stable=True)
    sorted_slots = sorted_key if event_seq is None else sorted_key % memory_slots
    return sorted_slots, perm, _segment_starts(sorted_key)


def _sort_lexicographic(slots: torch.Tensor, event_seq: torch.Tensor):
    """``sort_events`` by two stable int64 sorts (slot, then sequence): for key ranges beyond int64."""
    by_slot, perm = torch.sort(slots.to(torch.int64), dim=-1, stable=True)
    sorted_seq, outer = torch.sort(event_seq.expand_as(slots).gather(-1, perm), dim=-1, stable=True)
    perm = perm.gather(-1, outer)
    sorted_slots = by_slot.gather(-1, outer)
    return sorted_slots, perm, _segment_starts(sorted_slots) | _segment_starts(sorted_seq)


def _segment_starts(sorted_key: torch.Tensor) -> torch.Tensor:
    """``[R, E]`` bool: True where the sorted key differs from the one before (and at the first event)."""
    boundary = sorted_key[:, 1:] != sorted_key[:, :-1]
    first = torch.ones_like(boundary[:, :1])
    return torch.cat([first, boundary], dim=1)


@dataclass(frozen=True)
class EventStream:
    """The decoded tokens of one call and their events sorted by (sequence, slot)."""

    write_idx: torch.Tensor  # [B, T, H, K] slots (CAPE applied), weights and write decay
    write_w: torch.Tensor
    decay: torch.Tensor
    read_idx: torch.Tensor
    read_w: torch.Tensor
    sorted_slots: torch.Tensor  # [B*H, 2TK], in sort_events' key type
    perm: torch.Tensor  # [B*H, 2TK]: each sorted event's place t * 2K + lane (lanes < K write)
    start: torch.Tensor  # [B*H, 2TK] bool: the event starts a (sequence, slot) segment
    token_seq: torch.Tensor | None  # [T]: each packed token's sequence (None: sequence = batch row)
    offset: torch.Tensor  # [N]: tokens consumed before this call
    cu_seqlens: torch.Tensor | None
    seq_len: int
    heads: int
    topk: int
    memory_slots: int

    def state_rows(self, slot: torch.Tensor, token: torch.Tensor | None = None) -> torch.Tensor:
        """Row of each event's (sequence, head, slot) in the flat state, for events of ``slot``
        ``[B*H, E]`` (one row per batch row and head) made by the tokens ``token`` (``[E]`` or
        ``[B*H, E]``; None: the sorted events'). Tokens matter only for packed sequences."""
        row = torch.arange(self.perm.shape[0], device=slot.device)[:, None]
        if self.token_seq is None:
            seq = row // self.heads
        else:
            seq = self.token_seq[self.perm // (2 * self.topk) if token is None else token]
        return (seq * self.heads + row % self.heads) * self.memory_slots + slot

    def final_state(self, rows: torch.Tensor) -> RAMState:
        """The ``RAMState`` after this call from its flat state ``rows [N * H * M, d_v + 1]``."""
        final = rows.view(len(self.offset), self.heads, self.memory_slots, rows.shape[-1])
        d_v = rows.shape[-1] - 1
        return RAMState(final[..., :d_v].contiguous(), final[..., d_v].contiguous(),
                        offsets_after(self.offset, self.seq_len, self.cu_seqlens))


def call_offsets(q: torch.Tensor, initial_state: RAMState | None, cu_seqlens) -> torch.Tensor:
    """``[N]``: the tokens each sequence consumed before this call (0 without a state)."""
    if initial_state is not None:
        return initial_state.offset
    return torch.zeros(num_sequences(q, cu_seqlens), dtype=torch.long, device=q.device)


def offsets_after(offset: torch.Tensor, seq_len: int, cu_seqlens) -> torch.Tensor:
    """Each sequence's offset after a call of ``seq_len`` tokens per row (or ``cu_seqlens``' lengths)."""
    lengths = torch.full_like(offset, seq_len) if cu_seqlens is None else cu_seqlens.diff().to(offset.dtype)
    return offset + lengths


def decoded_call(q, k, spec: RAMSpec, initial_state: RAMState | None, cu_seqlens, use_triton: bool = False):
    """What every segment and chunk path starts from: the call's offsets ``[N]``, each token's sequence
    ``[B, T]`` and ``decode_tokens``' five ``[B, T, H, K]`` tensors (``use_triton``: the Triton decoder)."""
    offset = call_offsets(q, initial_state, cu_seqlens)
    seq, positions = token_positions(q.shape[0], q.shape[1], offset, cu_seqlens)
    return offset, seq, decode_tokens(q, k, spec, positions, use_triton=use_triton)


def sorted_events(q, k, spec: RAMSpec, initial_state: RAMState | None, cu_seqlens, use_triton: bool = False):
    """Decode every token of ``q, k [B, T, H, d_k]`` (``use_triton``: with the Triton decoder) and
    sort its events: the ``EventStream`` of one call."""
    batch, seq_len, heads, _ = q.shape
    num_seqs = num_sequences(q, cu_seqlens)
    offset, seq, tokens = decoded_call(q, k, spec, initial_state, cu_seqlens, use_triton)
    write_idx, write_w, decay, read_idx, read_w = tokens
    rows, topk = batch * heads, spec.topk
    slots = torch.cat([by_row(write_idx), by_row(read_idx)], dim=-1).reshape(rows, 2 * seq_len * topk)
    event_seq = None if cu_seqlens is None else seq[0].repeat_interleave(2 * topk)[None].expand(rows, -1)
    sorted_slots, perm, start = sort_events(slots, event_seq, spec.memory_slots, num_seqs)
    return EventStream(
        write_idx, write_w, decay, read_idx, read_w, sorted_slots, perm, start,
        token_seq=None if cu_seqlens is None else seq[0],
        offset=offset,
        cu_seqlens=cu_seqlens,
        seq_len=seq_len,
        heads=heads, topk=topk, memory_slots=spec.memory_slots,
    )


def state_table(state: RAMState) -> torch.Tensor:
    """``state`` as the flat rows ``[N * H * M, d_v + 1]`` of ``[S, z]``."""
    return torch.cat([state.S, state.z[..., None]], dim=-1).reshape(-1, state.S.shape[-1] + 1)
