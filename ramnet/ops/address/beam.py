"""Exact top-K of the product softmax by log-domain beam search (spec section 2).

``log rho[m] = sum_u log p_u[m_u]`` is a sum of per-partition terms, so the K best full addresses
only ever extend the K best prefixes with one of the K best entries of the next partition: keeping
K beams per partition is exact, and no M-sized vector is built (M can be 2**62).
"""

from __future__ import annotations

import torch


def partition_log_probs(x: torch.Tensor, num_partitions: int, tau: float) -> torch.Tensor:
    """``[..., d_k] -> [..., U, d_p]``: log-softmax of each partition at temperature ``tau``."""
    parts = x.unflatten(-1, (num_partitions, x.shape[-1] // num_partitions))
    return torch.log_softmax(parts / tau, dim=-1)


def beam_topk(x: torch.Tensor, num_partitions: int, topk: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[..., K]`` (int64, first partition most significant) and weights ``[..., K]``.

    Weights are sorted by decreasing value and differentiable: ``exp`` of the gathered sum of
    per-partition log-probabilities, so d rho[m] / d p_u[j] = rho[m] / p_u[j] where m_u = j.
    Computed in ``x``'s dtype; callers pass fp32 or fp64.
    """
    logp = partition_log_probs(x, num_partitions, tau)
    d_p = logp.shape[-1]
    per_part = min(topk, d_p)
    part_scores, part_index = logp.topk(per_part, dim=-1)  # [..., U, k'] sorted
    scores, index = part_scores[..., 0, :], part_index[..., 0, :]
    for u in range(1, num_partitions):
        cand_scores = scores.unsqueeze(-1) + part_scores[..., u, None, :]  # [..., beams, k']
        cand_index = index.unsqueeze(-1) * d_p + part_index[..., u, None, :]
        keep = min(topk, cand_scores.shape[-2] * per_part)
        scores, pick = cand_scores.flatten(-2).topk(keep, dim=-1)
        index = cand_index.flatten(-2).gather(-1, pick)
    return index, scores.exp()
