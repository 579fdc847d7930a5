"""The training path: segment-based PDMA (docs/kernels.md), no Python loop over time.

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
from .events import by_row, sorted_events, state_table
from .spec import RAMSpec
from .state import RAMState


def parallel_forward(q, k, v, spec: RAMSpec, initial_state: RAMState | None, output_final_state: bool, cu_seqlens):
    batch, seq_len, heads, _ = q.shape
    d_v, topk, memory_slots = v.shape[-1], spec.topk, spec.memory_slots
    width = d_v + 1  # S and z scanned together
    rows, events = batch * heads, seq_len * topk
    device = q.device

    stream = sorted_events(q, k, spec, initial_state, cu_seqlens)
    segment = stream.start.cumsum(1)
    step, lane = stream.perm // (2 * topk), stream.perm % (2 * topk)
    is_write = lane < topk

    # Writes in segment order; `w_src` indexes the flat [T*K] write arrays of the row.
    w_src = (step * topk + lane)[is_write].view(rows, events)
    w_segment = segment[is_write].view(rows, events)
    w_slot = stream.sorted_slots[is_write].view(rows, events)
    w_step = w_src // topk
    seg_first = torch.ones_like(w_segment[:, :1], dtype=torch.bool)
    w_start = torch.cat([seg_first, w_segment[:, 1:] != w_segment[:, :-1]], dim=1)

    init_flat = None
    if initial_state is not None:
        init_flat = state_table(initial_state)

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
        # reshape, not view: rows gathered by an index follow its strides, and by_row's reshape of the read
        # slots stays a transposed view when it can (K = 1 with several heads), a fuzz-found failure.
        h0 = init_flat[stream.state_rows(w_slot, w_step)].reshape(-1, width)
        r_slot = by_row(stream.read_idx).reshape(rows, events)
        miss_rows = init_flat[stream.state_rows(r_slot, torch.arange(events, device=device) // topk)].reshape(-1, width)
    v_ext = torch.cat([by_row(v), v.new_ones(rows, seq_len, 1)], dim=-1).view(rows * seq_len, width)
    o, h = segment_pdma(
        by_row(stream.decay).reshape(rows, events).gather(1, w_src).view(-1),
        by_row(stream.write_w).reshape(rows, events).gather(1, w_src).view(-1),
        v_ext,
        by_row(stream.read_w).reshape(-1),
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
        base = empty_row.repeat(len(stream.offset) * heads * memory_slots, 1)
    else:
        base = init_flat
    return o, stream.final_state(base.index_put((stream.state_rows(w_slot, w_step)[w_end],), h[w_end]))
