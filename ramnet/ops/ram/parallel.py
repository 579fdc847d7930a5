"""The training path: segment-based PDMA (spec section 7), no Python loop over time.

Per (batch row, head), every token makes K write events and K read events. Sorting the events by
(sequence, slot) with a stable sort keeps them in time order inside each slot, writes before reads
of the same step (the read at step t sees the write of step t). Each slot's writes then form one
contiguous segment in which PDMA is a scalar-decay linear recurrence
``h <- a * h + w * [v, 1]`` (S and z together), run for all segments of all rows at once by one
segmented scan; a read gathers the state after the last write to its slot at or before its step.
Memory is O(T * K * d_v): no M-sized vector per token and no M x d_v state, except the final
state when it is asked for.
"""

from __future__ import annotations

import torch

from ..pdma import segment_pdma
from .common import by_row, decode_tokens, num_sequences, sort_events, token_positions
from .spec import RAMSpec
from .state import RAMState


def parallel_forward(q, k, v, spec: RAMSpec, initial_state: RAMState | None, output_final_state: bool, cu_seqlens):
    batch, seq_len, heads, _ = q.shape
    d_v, topk, memory_slots = v.shape[-1], spec.topk, spec.memory_slots
    width = d_v + 1  # S and z scanned together
    rows, events = batch * heads, seq_len * topk
    device = q.device
    num_seqs = num_sequences(q, cu_seqlens)
    offset = initial_state.offset if initial_state is not None else torch.zeros(num_seqs, dtype=torch.long, device=device)

    seq, positions = token_positions(batch, seq_len, offset, cu_seqlens)
    write_idx, write_w, decay, read_idx, read_w = decode_tokens(q, k, spec, positions)

    # Events of row r laid out [T, 2K] (K writes then K reads per step), sorted by (sequence, slot).
    slots = torch.cat([by_row(write_idx), by_row(read_idx)], dim=-1).reshape(rows, 2 * events)
    event_seq = None
    if cu_seqlens is not None:
        event_seq = seq[0].repeat_interleave(2 * topk)[None].expand(rows, -1)
    sorted_slots, perm, new_segment = sort_events(slots, event_seq, memory_slots, num_seqs)
    segment = new_segment.cumsum(1)
    step, lane = perm // (2 * topk), perm % (2 * topk)
    is_write = lane < topk

    # Writes in segment order; `w_src` indexes the flat [T*K] write arrays of the row.
    w_src = (step * topk + lane)[is_write].view(rows, events)
    w_segment = segment[is_write].view(rows, events)
    w_slot = sorted_slots[is_write].view(rows, events)
    w_step = w_src // topk
    seg_first = torch.ones_like(w_segment[:, :1], dtype=torch.bool)
    w_start = torch.cat([seg_first, w_segment[:, 1:] != w_segment[:, :-1]], dim=1)

    # Index of each event's (sequence, head, slot) row in the flat [N*H*M, D] state.
    row_head = (torch.arange(rows, device=device) % heads)[:, None]
    row_seq = (torch.arange(rows, device=device) // heads)[:, None]

    def state_row(event_step, event_slot):
        n = row_seq if cu_seqlens is None else seq[0][event_step]
        return (n * heads + row_head) * memory_slots + event_slot

    init_flat = None
    if initial_state is not None:
        init_flat = torch.cat([initial_state.S, initial_state.z[..., None]], dim=-1).reshape(-1, width)

    # Each read takes the state after the last write at or before it in its segment, if any.
    last_write = (is_write.cumsum(1) - 1)[~is_write].view(rows, events)
    r_segment = segment[~is_write].view(rows, events)
    r_dst = (step * topk + lane - topk)[~is_write].view(rows, events)
    src = last_write.clamp(min=0)
    hit = (last_write >= 0) & (w_segment.gather(1, src) == r_segment)
    # Back to token order, and to indices into all rows' writes flattened.
    row_base = torch.arange(rows, device=device)[:, None] * events
    src = torch.empty_like(src).scatter_(1, r_dst, src) + row_base
    hit = torch.empty_like(hit).scatter_(1, r_dst, hit)

    h0 = miss_rows = None
    if initial_state is not None:
        h0 = init_flat[state_row(w_step, w_slot)].view(-1, width)
        r_slot = by_row(read_idx).reshape(rows, events)
        miss_rows = init_flat[state_row(torch.arange(events, device=device) // topk, r_slot)].view(-1, width)
    v_ext = torch.cat([by_row(v), v.new_ones(rows, seq_len, 1)], dim=-1).view(rows * seq_len, width)
    o, h = segment_pdma(
        by_row(decay).reshape(rows, events).gather(1, w_src).view(-1),
        by_row(write_w).reshape(rows, events).gather(1, w_src).view(-1),
        v_ext,
        by_row(read_w).reshape(-1),
        write_token=(w_step + torch.arange(rows, device=device)[:, None] * seq_len).view(-1),
        seg_start=w_start.view(-1),
        read_src=src.view(-1),
        hit=hit.view(-1),
        topk=topk,
        eps=spec.eps,
        empty_z=1.0 / memory_slots,
        h0=h0,
        miss_rows=miss_rows,
    )
    o = o.view(batch, heads, seq_len, d_v).transpose(1, 2)
    h = h.view(rows, events, width)

    if not output_final_state:
        return o, None
    # The last write of each segment holds that slot's final content.
    seg_last = torch.ones_like(w_start[:, :1])
    w_end = torch.cat([w_start[:, 1:], seg_last], dim=1)
    if initial_state is None:
        empty_row = torch.cat([q.new_zeros(d_v), q.new_full((1,), 1.0 / memory_slots)])
        base = empty_row.repeat(num_seqs * heads * memory_slots, 1)
    else:
        base = init_flat
    final = base.index_put((state_row(w_step, w_slot)[w_end],), h[w_end])
    final = final.view(num_seqs, heads, memory_slots, width)
    lengths = torch.full_like(offset, seq_len) if cu_seqlens is None else cu_seqlens.diff()
    return o, RAMState(final[..., :d_v].contiguous(), final[..., d_v].contiguous(), offset + lengths)
