"""The address decoder A_{K,U}: product softmax, exact top-K, CAPE."""

from __future__ import annotations

import torch

from ..checks import check_finite, check_float_tensor, check_positive, check_topk, compute_dtype, memory_geometry
from .beam import beam_topk
from .cape import cape_shift
from .dense import cape_dense, dense_product_softmax, dense_topk_address

__all__ = ["address_decode", "beam_topk", "cape_shift", "cape_dense", "dense_product_softmax", "dense_topk_address"]


def address_decode(x: torch.Tensor, *, num_partitions: int, topk: int, tau: float = 1.0):
    """Decode ``x [..., d_k]`` into K-hot addresses over ``M = (d_k / U) ** U`` slots.

    Returns ``(indices, weights)``, both ``[..., K]``: int64 slot indices (first partition most
    significant) and the product-softmax weights, in the order of the tie rule (decreasing weight;
    equal scores by increasing slot, ``beam.py``), in ``x``'s dtype (computed in fp32, or fp64 for
    fp64 input). Exact top-K by log-domain beam search, so M may be
    as large as 2**62. Only ``weights`` is differentiable.
    """
    check_float_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the last is d_k)")
    _, memory_slots = memory_geometry(x.shape[-1], num_partitions)
    topk = check_topk(topk, memory_slots)
    tau = check_positive("tau", tau)
    check_finite("x", x)
    compute = compute_dtype(x.dtype)
    indices, weights = beam_topk(x.to(compute), int(num_partitions), topk, tau)
    return indices, weights.to(x.dtype)
