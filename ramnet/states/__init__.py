"""How a RAM layer keeps its state while decoding (docs/trace.md): dense on the device (``RAMState``, the
default), sparse (``SparseState``: only the written slots) or host-resident with a device cache of hot
slots (``OffloadState``). ``RAMNetCache(ram_state=...)`` picks one; all three give the same outputs."""

from .base import SlotStore, make_store
from .offload import OffloadState, dense_state_fraction
from .sparse import SparseState

RAM_STATES = ("dense", "sparse", "offload")

__all__ = ["OffloadState", "RAM_STATES", "SlotStore", "SparseState", "dense_state_fraction", "make_store"]
