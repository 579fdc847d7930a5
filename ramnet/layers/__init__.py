"""Token mixers with flash-linear-attention's layer signature."""

from .hybrid import HybridRAMAttention, SlidingWindowAttention
from .ram_attention import RAMAttention

__all__ = ["HybridRAMAttention", "RAMAttention", "SlidingWindowAttention"]
