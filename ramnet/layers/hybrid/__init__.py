"""Hybrid quadratic-linear memory (spec section 9; Irie, Yau, Gershman 2025) and plain softmax attention.

``window``: the KV memory (``KVWindow``, RoPE, windowed softmax attention); ``layer``:
``HybridRAMAttention``, the KV memory and a fast-weight memory (``ramnet.layers.memories``) in one
layer; ``sliding``: ``SlidingWindowAttention``, the KV memory alone.
"""

from ..memories import DeltaState
from .layer import BLENDS, FAST_WEIGHTS, MIXES, HybridRAMAttention
from .sliding import SlidingWindowAttention
from .window import KVWindow, rotary

__all__ = [
    "BLENDS", "FAST_WEIGHTS", "MIXES", "DeltaState", "HybridRAMAttention", "KVWindow", "SlidingWindowAttention", "rotary",
]
