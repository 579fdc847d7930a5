"""The Triton path: the parallel path's segment-sorted PDMA with the scan, the reads and their
backward fused into Triton kernels. Computes in fp32 (fp64 inputs too). Runs on CUDA, or on CPU
under ``TRITON_INTERPRET=1``.

The PDMA kernels (``ops/pdma/triton_kernels.py``) walk the slot-sorted events in a loop, one
program per chunk of events with the channels across threads. (An earlier family ran blocks of
events through ``tl.associative_scan``; on an H200 the op took 8.94 ms against 5.99 ms for these
kernels at B8 T2048, and it was removed: ``benchmarks/results/README.md``.)
"""

from __future__ import annotations

import torch

from ..triton_support import require_triton
from .common import by_row, decode_tokens, num_sequences, sort_events, token_positions
from .spec import RAMSpec
from .state import RAMState


def triton_forward(q, k, v, spec: RAMSpec, initial_state: RAMState | None, output_final_state: bool, cu_seqlens):
    require_triton(q.device, 'mode="triton"')
    from ..pdma.triton import segment_pdma_triton  # imports triton, an optional dependency

    batch, seq_len, heads, _ = q.shape
    d_v, topk, memory_slots = v.shape[-1], spec.topk, spec.memory_slots
    rows, device = batch * heads, q.device
    num_seqs = num_sequences(q, cu_seqlens)
    offset = initial_state.offset if initial_state is not None else torch.zeros(num_seqs, dtype=torch.long, device=device)

    seq, positions = token_positions(batch, seq_len, offset, cu_seqlens)
    write_idx, write_w, decay, read_idx, read_w = decode_tokens(q, k, spec, positions, use_triton=True)
    slots = torch.cat([by_row(write_idx), by_row(read_idx)], dim=-1).reshape(rows, 2 * seq_len * topk)
    event_seq = None if cu_seqlens is None else seq[0].repeat_interleave(2 * topk)[None].expand(rows, -1)
    sorted_slots, perm, start = sort_events(slots, event_seq, memory_slots, num_seqs)

    sidx = h0 = None
    if initial_state is not None or output_final_state:
        # Row of each event's (sequence, head, slot) in the flat [N*H*M, d_v + 1] state.
        row = torch.arange(rows, device=device)[:, None]
        n = row // heads if cu_seqlens is None else seq[0][perm // (2 * topk)]
        sidx = (n * heads + row % heads) * memory_slots + sorted_slots
    if initial_state is not None:
        h0 = torch.cat([initial_state.S, initial_state.z[..., None]], dim=-1).float().reshape(-1, d_v + 1)

    o, final = segment_pdma_triton(
        decay, write_w, read_w, v, perm=perm.to(torch.int32), start=start.to(torch.int8), eps=spec.eps,
        empty_z=1.0 / memory_slots, h0=h0, sidx=sidx,
        final_rows=num_seqs * heads * memory_slots if output_final_state else 0,
    )
    o = o.to(q.dtype)
    if not output_final_state:
        return o, None
    final = final.view(num_seqs, heads, memory_slots, d_v + 1).to(q.dtype)
    lengths = torch.full_like(offset, seq_len) if cu_seqlens is None else cu_seqlens.diff()
    return o, RAMState(final[..., :d_v].contiguous(), final[..., d_v].contiguous(), offset + lengths)
