"""``ramnet trace``: which memory slots every token writes and reads (the RAM-Net paper's Fig. 5), and how
well caches of hot slots would serve them (docs/trace.md).

``record``: the slots, recorded from the layers' own address decoding; ``analysis``: reuse distances and
LRU/LFU/Belady hit rates; ``report``: the plot and the table; ``core``: ``trace_model``, all of it.
"""

from .analysis import belady_hit_rate, lfu_hit_rate, lru_hit_rates, stack_distances
from .core import DEFAULT_BUDGETS, trace_model
from .record import LayerTrace, record_trace, recording

__all__ = ["DEFAULT_BUDGETS", "LayerTrace", "belady_hit_rate", "lfu_hit_rate", "lru_hit_rates", "record_trace",
           "recording", "stack_distances", "trace_model"]
