"""PDMA building blocks: the proxy-gradient decay, the chunked linear scan and the fused
segment scan + read of the parallel path."""

from .decay import proxy_decay, proxy_decay_slope
from .scan import linear_scan
from .segments import segment_pdma

__all__ = ["proxy_decay", "proxy_decay_slope", "linear_scan", "segment_pdma"]
