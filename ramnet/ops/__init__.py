"""RAM-Net ops: the address decoder and RAM attention."""

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
