"""Token mixers with flash-linear-attention's layer signature.

``ram_attention``: ``RAMAttention`` (RAM-Net); ``hybrid``: ``HybridRAMAttention``, a KV memory and a
fast-weight memory (``memories``) in one layer; ``attention``: ``SlidingWindowAttention``, softmax
attention with RoPE. ``kv_window`` holds the KV memory the last two share, ``padding`` what every
mixer does with a padded batch.
"""

from .attention import SlidingWindowAttention
from .hybrid import HybridRAMAttention
from .ram_attention import RAMAttention

__all__ = ["HybridRAMAttention", "RAMAttention", "SlidingWindowAttention"]
