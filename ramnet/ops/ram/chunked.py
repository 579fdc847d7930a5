"""The op over chunked PDMA (``ops/pdma/chunk.py`` and its Triton kernels): decode every token,
then run the chunks on the token layout, with no sort of the events. The Triton path takes it when
the state table is small enough (``ram/triton.py``); with ``use_triton=False`` it runs the torch
reference (the tests compare both with the other paths)."""

from __future__ import annotations

from ..pdma.chunk import chunk_pdma
from .events import decoded_call, offsets_after
from .spec import RAMSpec
from .state import RAMState


def chunked_forward(q, k, v, spec: RAMSpec, initial_state: RAMState | None, output_final_state: bool, cu_seqlens,
                    use_triton: bool = True, kernels: str = "chunked"):
    offset, _, tokens = decoded_call(q, k, spec, initial_state, cu_seqlens, use_triton)
    h0 = None if initial_state is None else (initial_state.S, initial_state.z)
    kw = dict(memory_slots=spec.memory_slots, eps=spec.eps, initial_state=h0, output_final_state=output_final_state,
              cu_seqlens=cu_seqlens)
    if use_triton and kernels == "token":
        from ..pdma.token_triton import token_pdma_triton  # imports triton, an optional dependency

        o, final = token_pdma_triton(*tokens, v, **kw)
    elif use_triton:
        from ..pdma.chunk_triton import chunk_pdma_triton  # imports triton, an optional dependency

        o, final = chunk_pdma_triton(*tokens, v, **kw)
    else:
        o, final = chunk_pdma(*tokens, v, **kw)
    o = o.to(q.dtype)
    if final is None:
        return o, None
    return o, RAMState(final[0].to(q.dtype), final[1].to(q.dtype), offsets_after(offset, q.shape[1], cu_seqlens))
