"""The op over PDMA on the tokens as decoded, the state as a table of rows per (sequence, head, slot),
no sort of the events: the token-by-token Triton kernels (``ops/pdma/token_triton.py``), or with
``use_triton=False`` the chunked torch reference (``ops/pdma/chunk.py``), which computes the same
recurrence a chunk of tokens at a time. The Triton path takes it when ``pdma_kernels("token")`` asks
for it (``ram/triton.py``), and with ``kernels="onchip"`` (``pdma_kernels("onchip")``) runs the token
kernels' CUDA C versions instead, their tables in shared memory (``ops/pdma/onchip.py``: the forward, and the
backward where the state and its adjoint fit); the tests compare them with the other paths."""

from __future__ import annotations

from ..pdma.chunk import chunk_pdma
from .events import decoded_call, offsets_after
from .spec import RAMSpec
from .state import RAMState


def table_forward(q, k, v, spec: RAMSpec, initial_state: RAMState | None, output_final_state: bool, cu_seqlens,
                  use_triton: bool = True, kernels: str = "token"):
    offset, _, tokens = decoded_call(q, k, spec, initial_state, cu_seqlens, use_triton)
    h0 = None if initial_state is None else (initial_state.S, initial_state.z)
    kw = dict(memory_slots=spec.memory_slots, eps=spec.eps, initial_state=h0, output_final_state=output_final_state,
              cu_seqlens=cu_seqlens)
    if use_triton and kernels == "onchip":
        from ..pdma.onchip import onchip_pdma  # imports triton (its backward), an optional dependency

        o, final = onchip_pdma(*tokens, v, **kw)
    elif use_triton:
        from ..pdma.token_triton import token_pdma_triton  # imports triton, an optional dependency

        o, final = token_pdma_triton(*tokens, v, **kw)
    else:
        o, final = chunk_pdma(*tokens, v, **kw)
    o = o.to(q.dtype)
    if final is None:
        return o, None
    return o, RAMState(final[0].to(q.dtype), final[1].to(q.dtype), offsets_after(offset, q.shape[1], cu_seqlens))
