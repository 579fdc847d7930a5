"""RAM attention: one signature, several execution paths (naive reference, recurrent decoding,
segment-based parallel training)."""

from functools import partial

from .interface import PATHS, ram_attention
from .recurrent import pdma_step
from .state import RAMState

naive_ram_attention = partial(ram_attention, mode="naive")
recurrent_ram_attention = partial(ram_attention, mode="recurrent")
parallel_ram_attention = partial(ram_attention, mode="parallel")

__all__ = [
    "PATHS",
    "RAMState",
    "ram_attention",
    "naive_ram_attention",
    "recurrent_ram_attention",
    "parallel_ram_attention",
    "pdma_step",
]
