"""CAPE on sparse addresses (docs/ops.md).

``[P_t(a)]_i = a[(i + t) mod M]`` moves a slot ``j`` chosen at step ``t`` to ``(j - t) mod M``;
applying it to both write and read addresses makes matches depend on ``t - t'`` only.
"""

from __future__ import annotations

import torch


def cape_shift(indices: torch.Tensor, positions: torch.Tensor, enabled: torch.Tensor, memory_slots: int) -> torch.Tensor:
    """Shift slot ``indices [B, T, H, K]`` by the absolute ``positions [B, T]`` on heads where
    ``enabled [H]`` is true."""
    shift = positions[:, :, None, None] * enabled.to(positions.dtype)[None, None, :, None]
    return torch.remainder(indices - shift, memory_slots)
