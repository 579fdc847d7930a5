"""RAM attention: one signature, several execution paths (naive reference, recurrent decoding,
segment-based parallel training, fused Triton kernels) and the decoding step for serving."""

from functools import partial

from .interface import PATHS, ram_attention, run_ram_attention
from .recurrent import pdma_step
from .state import RAMState
from .step import decode_spec, pdma_step_triton, ram_decode_step

naive_ram_attention = partial(ram_attention, mode="naive")
recurrent_ram_attention = partial(ram_attention, mode="recurrent")
parallel_ram_attention = partial(ram_attention, mode="parallel")
triton_ram_attention = partial(ram_attention, mode="triton")

__all__ = [
    "PATHS",
    "RAMState",
    "ram_attention",
    "run_ram_attention",
    "naive_ram_attention",
    "recurrent_ram_attention",
    "parallel_ram_attention",
    "triton_ram_attention",
    "pdma_step",
    "pdma_step_triton",
    "ram_decode_step",
    "decode_spec",
]
