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
from .events import sorted_events, state_table
from .spec import RAMSpec
from .state import RAMState


def triton_forward(q, k, v, spec: RAMSpec, initial_state: RAMState | None, output_final_state: bool, cu_seqlens):
    require_triton(q.device, 'mode="triton"')
    from ..pdma.triton import segment_pdma_triton  # imports triton, an optional dependency

    stream = sorted_events(q, k, spec, initial_state, cu_seqlens, use_triton=True)
    num_seqs, heads, memory_slots = len(stream.offset), q.shape[2], spec.memory_slots
    sidx = h0 = None
    if initial_state is not None or output_final_state:
        sidx = stream.state_rows(stream.sorted_slots)
    if initial_state is not None:
        h0 = state_table(initial_state).float()

    o, final = segment_pdma_triton(
        stream.decay, stream.write_w, stream.read_w, v, perm=stream.perm.to(torch.int32),
        start=stream.start.to(torch.int8), eps=spec.eps, empty_z=1.0 / memory_slots, h0=h0, sidx=sidx,
        final_rows=num_seqs * heads * memory_slots if output_final_state else 0,
    )
    o = o.to(q.dtype)
    if not output_final_state:
        return o, None
    return o, stream.final_state(final.to(q.dtype))
