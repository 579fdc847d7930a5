"""The Triton path: the parallel path's segment-sorted PDMA with the scan, the reads and their
backward fused into Triton kernels, or the chunked PDMA kernels (``ram/chunked.py``) when the state
table is small enough (``pdma_kernels_for``). Computes in fp32 (fp64 inputs too). Runs on CUDA, or
on CPU under ``TRITON_INTERPRET=1``.

The PDMA kernels (``ops/pdma/triton_kernels.py``) walk the slot-sorted events in a loop, one
program per chunk of events with the channels across threads. (An earlier family ran blocks of
events through ``tl.associative_scan``; on an H200 the op took 8.94 ms against 5.99 ms for these
kernels at B8 T2048, and it was removed: ``benchmarks/results/README.md``.)
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..pdma.chunk import KERNEL_MAX_TOPK
from ..triton_support import require_triton
from .chunked import chunked_forward
from .common import num_sequences
from .events import sorted_events, state_table
from .spec import RAMSpec
from .state import RAMState

# The chunked kernels keep the state as tables of N*H*M rows (three in the backward: the state, its
# rolled-back copy and the adjoint), whose set-up and copies cost time and memory in M, not in the
# tokens. They run when a table has at most this many rows per write event of the call (B*T*H*K):
# then the tables cost no more than the event rows both families keep (the chunked kernels' saved
# rows, the sorted kernels' per-event reads). At the paper's M = 1024 and K = 8 that is T >= 128.
CHUNKED_TABLE_ROWS_PER_EVENT = 1
# Whether "auto" picks the chunked kernels for CUDA inputs too. Off: since c152e2d (atomic adds in the
# backward) they pass their GPU tests (an H100 at b04c174), but fwd+bwd through the op they took 4.5x the
# slot-sorted kernels' time at B8 T2048 and 7.1x at B1 T32768 (benchmarks/results/chunk_pdma_h100.md;
# docs/kernels.md). Turn on where benchmarks/bench_chunk_pdma.py shows them faster.
CHUNKED_BY_DEFAULT_ON_CUDA = False

KERNEL_FAMILIES = ("token", "chunked", "sorted")
_forced: str | None = None


@contextmanager
def pdma_kernels(kind: str):
    """Inside the block, the Triton path runs the ``"token"``, ``"chunked"`` or ``"sorted"`` PDMA
    kernels whatever the sizes (``"auto"``: by ``pdma_kernels_for``). For tests and benchmarks."""
    global _forced
    if kind not in ("auto", *KERNEL_FAMILIES):
        raise ValueError(f"kind must be 'auto', 'token', 'chunked' or 'sorted', got {kind!r}")
    before, _forced = _forced, (None if kind == "auto" else kind)
    try:
        yield
    finally:
        _forced = before


def pdma_kernels_for(q: torch.Tensor, spec: RAMSpec, cu_seqlens) -> str:
    """``"token"``, ``"chunked"`` or ``"sorted"``: the PDMA kernels the Triton path runs for this call."""
    if _forced is not None:
        return _forced
    if q.is_cuda and not CHUNKED_BY_DEFAULT_ON_CUDA:
        return "sorted"
    batch, seq_len, heads = q.shape[:3]
    table_rows = num_sequences(q, cu_seqlens) * heads * spec.memory_slots  # exact: M may be 2**62
    events = batch * seq_len * heads * spec.topk
    fits = table_rows <= CHUNKED_TABLE_ROWS_PER_EVENT * events and spec.memory_slots < 2**31
    return "chunked" if fits and spec.topk <= KERNEL_MAX_TOPK else "sorted"


def triton_forward(q, k, v, spec: RAMSpec, initial_state: RAMState | None, output_final_state: bool, cu_seqlens):
    require_triton(q.device, 'mode="triton"')
    kernels = pdma_kernels_for(q, spec, cu_seqlens)
    if kernels != "sorted":
        return chunked_forward(q, k, v, spec, initial_state, output_final_state, cu_seqlens, use_triton=True,
                               kernels=kernels)
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
