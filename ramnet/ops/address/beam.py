"""Exact top-K of the product softmax by log-domain beam search (spec section 2).

``log rho[m] = sum_u log p_u[m_u]`` is a sum of per-partition terms, so the K best full addresses
only ever extend the K best prefixes with one of the K best entries of the next partition: keeping
K beams per partition is exact, and no M-sized vector is built (M can be 2**62).

The tie rule, the same on every path and kernel (the naive path's dense top-K, this beam search,
the Triton decoder and the fused decoding step): slots are ranked by their score
``s[m] = sum_u x_u[m_u] / tau``, the partition logits summed from the first partition in the
compute dtype, and among equal scores the lower slot index ``m`` (before CAPE) comes first. The
score is ``log rho[m]`` up to a constant of the row (each partition's log-normaliser), so this is
the top-K of ``rho``; unlike the log-probabilities, it involves no exp or log, whose last bit
differs between torch and Triton, so every implementation computes the same scores. On bf16 inputs
(and tau 1 or a power of two) the sums are exact in fp32 and fp64 alike, and every path and dtype
picks the same slots.
"""

from __future__ import annotations

import torch


def partition_logits(x: torch.Tensor, num_partitions: int, tau: float) -> torch.Tensor:
    """``[..., d_k] -> [..., U, d_p]``: each partition's logits at temperature ``tau``."""
    return x.unflatten(-1, (num_partitions, x.shape[-1] // num_partitions)) / tau


def partition_log_probs(x: torch.Tensor, num_partitions: int, tau: float) -> torch.Tensor:
    """``[..., d_k] -> [..., U, d_p]``: log-softmax of each partition at temperature ``tau``."""
    return torch.log_softmax(partition_logits(x, num_partitions, tau), dim=-1)


def beam_topk(x: torch.Tensor, num_partitions: int, topk: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[..., K]`` (int64, first partition most significant) and weights ``[..., K]``, in
    the order of the tie rule (module docstring): decreasing score, then increasing index.

    Weights are differentiable: ``exp`` of the gathered sum of per-partition log-probabilities, so
    d rho[m] / d p_u[j] = rho[m] / p_u[j] where m_u = j. Computed in ``x``'s dtype; callers pass
    fp32 or fp64.
    """
    logits = partition_logits(x, num_partitions, tau)
    logp = torch.log_softmax(logits, dim=-1)
    d_p = logp.shape[-1]
    per_part = min(topk, d_p)
    # Entries are in increasing order, so a stable descending sort puts lower entries first among ties.
    part_scores, part_index = logits.sort(dim=-1, descending=True, stable=True)
    part_scores, part_index = part_scores[..., :per_part], part_index[..., :per_part]  # [..., U, k']
    part_logp = logp.gather(-1, part_index)
    scores, log_w, index = part_scores[..., 0, :], part_logp[..., 0, :], part_index[..., 0, :]
    for u in range(1, num_partitions):
        cand_scores = scores.unsqueeze(-1) + part_scores[..., u, None, :]  # [..., beams, k']
        cand_log_w = log_w.unsqueeze(-1) + part_logp[..., u, None, :]
        cand_index = index.unsqueeze(-1) * d_p + part_index[..., u, None, :]
        keep = min(topk, cand_scores.shape[-2] * per_part)
        scores, index, pick = best_first(cand_scores.flatten(-2), cand_index.flatten(-2), keep)
        log_w = cand_log_w.flatten(-2).gather(-1, pick)
    return index, log_w.exp()


def best_first(scores: torch.Tensor, index: torch.Tensor, keep: int):
    """The ``keep`` best of the candidates ``scores, index [..., C]`` (distinct indices) by the tie
    rule: decreasing score, then increasing index (``torch.topk`` leaves the order of ties open).
    Returns their scores, indices and positions among the C candidates."""
    index, by_index = index.sort(dim=-1)
    scores, order = scores.gather(-1, by_index).sort(dim=-1, descending=True, stable=True)
    order = order[..., :keep]
    return scores[..., :keep], index.gather(-1, order), by_index.gather(-1, order)
