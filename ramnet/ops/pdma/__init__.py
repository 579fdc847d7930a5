"""PDMA building blocks: the proxy-gradient decay and the segmented linear scan."""

from .decay import proxy_decay, proxy_decay_slope
from .scan import linear_scan

__all__ = ["proxy_decay", "proxy_decay_slope", "linear_scan"]
