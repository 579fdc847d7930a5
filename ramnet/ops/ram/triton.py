"""The Triton path: the parallel path's segment-sorted PDMA with the scan, the reads and their
backward fused into Triton kernels, or the token-by-token PDMA kernels (``ram/table.py``) when
``pdma_kernels("token")`` asks for them, or (``pdma_kernels("onchip")``, CUDA only) their CUDA C versions
with the tables in shared memory (``ops/pdma/onchip.py``). Computes in fp32 (fp64 inputs too). Runs
on CUDA, or on CPU under ``TRITON_INTERPRET=1``.

The PDMA kernels (``ops/pdma/triton_kernels.py``) walk the slot-sorted events in a loop, one
program per chunk of events with the channels across threads. (An earlier family ran blocks of
events through ``tl.associative_scan``; on an H200 the op took 8.94 ms against 5.99 ms for these
kernels at B8 T2048, and it was removed: ``benchmarks/results/README.md``. A chunked family over state
tables, C = 16 tokens a step, took 4.5x and 7.1x their time on an H100 and was removed for the
token-by-token one, which is simpler and faster at both shapes: ``docs/kernels.md``.)
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..triton_support import require_triton
from .events import sorted_events, state_table
from .spec import RAMSpec
from .state import RAMState
from .table import table_forward

# "auto" runs the slot-sorted kernels: on an H100 (benchmarks/results/pdma_kernels_h100.md) the token
# kernels took 1.36x their forward+backward at B8 T2048 and 5.6x at B1 T32768; a token costs a round trip
# to L2 in a chain, so they can only win where sequences are short and many. "onchip" (the token family with
# its tables in shared memory, CUDA C) is forced only, until it is measured on a GPU.
KERNEL_FAMILIES = ("token", "sorted", "onchip")
_forced: str | None = None


@contextmanager
def pdma_kernels(kind: str):
    """Inside the block, the Triton path runs the ``"token"``, ``"sorted"`` or ``"onchip"`` PDMA kernels
    whatever the sizes (``"auto"``: the sorted ones, ``pdma_kernels_for``). For tests and benchmarks.
    ``"onchip"`` runs on CUDA only and raises elsewhere (no fallback)."""
    global _forced
    if kind not in ("auto", *KERNEL_FAMILIES):
        raise ValueError(f"kind must be 'auto', 'token', 'sorted' or 'onchip', got {kind!r}")
    before, _forced = _forced, (None if kind == "auto" else kind)
    try:
        yield
    finally:
        _forced = before


def pdma_kernels_for() -> str:
    """``"token"``, ``"sorted"`` or ``"onchip"``: the PDMA kernels the Triton path runs now (the token
    and on-chip kernels refuse K > 8 and M >= 2**31 with a ValueError, the on-chip ones a table slice
    that does not fit in shared memory too). No size rule: the sorted kernels were as fast or
    faster at every shape measured."""
    return _forced or "sorted"


def triton_forward(q, k, v, spec: RAMSpec, initial_state: RAMState | None, output_final_state: bool, cu_seqlens):
    kernels = pdma_kernels_for()
    require_triton(q.device, 'mode="triton"')
    if kernels == "onchip":  # before decoding, and never a fallback
        from ..pdma.onchip import require_onchip  # imports triton (the token kernels), an optional dependency

        require_onchip(q.device, spec.memory_slots, v.shape[-1])
    if kernels in ("token", "onchip"):
        return table_forward(q, k, v, spec, initial_state, output_final_state, cu_seqlens, use_triton=True,
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
