"""Validated arguments of one ``ram_attention`` call, shared by all execution paths."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RAMSpec:
    num_partitions: int
    partition_dim: int
    memory_slots: int
    topk: int
    tau: float
    eps: float
    proxy_eps: float
    gamma: torch.Tensor  # [H], compute dtype
    cape: torch.Tensor  # [H], bool
    inplace_state: bool = False  # recurrent path: update the initial state's tensors in place
