"""Token mixers with flash-linear-attention's layer signature."""

from .ram_attention import RAMAttention

__all__ = ["RAMAttention"]
