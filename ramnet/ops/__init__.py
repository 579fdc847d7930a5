"""RAM-Net ops: the address decoder and RAM attention.

``address/`` decodes keys and queries into K-hot slot addresses, ``pdma/`` holds the memory's
building blocks (proxy decay, scans, the segment PDMA of the parallel path), and ``ram/`` is the op:
``ram_attention`` (``ram/interface.py``) over its execution paths, one module each, named after the
mode (``naive``, ``recurrent``, ``parallel``, ``triton``), and ``ram_decode_step`` for serving.

Triton code, one convention in every family: ``<name>_kernels.py`` holds only ``@triton.jit``
code, and ``<name>.py`` beside it launches it (launch shapes, compile-time constants, autograd
Functions): ``address/triton_kernels.py`` + ``address/triton.py`` (the decoder),
``pdma/triton_kernels.py`` + ``pdma/triton.py`` (segment PDMA), ``ram/step_kernels.py`` +
``ram/step.py`` (the decoding step). Jit helpers shared across families live in one kernels file
(``beam_topk_rows``, ``cape_shift_slots`` in ``address/triton_kernels.py``). The kernels files import
triton unconditionally: only the launchers import them, and only once Triton is known to be there.
"""

from .address import address_decode
from .ram import (
    RAMState,
    naive_ram_attention,
    parallel_ram_attention,
    ram_attention,
    ram_decode_step,
    recurrent_ram_attention,
    triton_ram_attention,
)

__all__ = [
    "address_decode",
    "ram_attention",
    "naive_ram_attention",
    "recurrent_ram_attention",
    "parallel_ram_attention",
    "triton_ram_attention",
    "ram_decode_step",
    "RAMState",
]
