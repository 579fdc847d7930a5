"""Validated arguments of one ``ram_attention`` call, shared by all execution paths."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_positive, check_topk, memory_geometry, per_head

DEFAULT_PROXY_EPS = 1e-2


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


def build_spec(heads: int, d_k: int, *, num_partitions: int, topk: int, gamma=1.0, tau: float = 1.0,
               eps: float = 1e-6, proxy_eps: float = DEFAULT_PROXY_EPS, cape=False, dtype=torch.float32,
               device=None, inplace_state: bool = False) -> RAMSpec:
    """Check the memory geometry and hyper-parameters once; raise ValueError naming the argument.
    ``dtype`` is the compute dtype (of gamma); ``gamma`` and ``cape`` are scalars or ``[H]``."""
    d_p, memory_slots = memory_geometry(d_k, num_partitions)
    gamma_h = per_head("gamma", gamma, heads, dtype, device)
    if not bool(torch.isfinite(gamma_h).all()) or bool((gamma_h < 0).any()):
        raise ValueError(f"gamma must be finite and >= 0, got {gamma}")
    return RAMSpec(
        num_partitions=int(num_partitions),
        partition_dim=d_p,
        memory_slots=memory_slots,
        topk=check_topk(topk, memory_slots),
        tau=check_positive("tau", tau),
        eps=check_positive("eps", eps, allow_zero=True),
        proxy_eps=check_positive("proxy_eps", proxy_eps, upper=1.0),
        gamma=gamma_h,
        cape=per_head("cape", cape, heads, torch.bool, device),
        inplace_state=bool(inplace_state),
    )
