"""Exact top-K of the product softmax by log-domain beam search (docs/ops.md).

``log rho[m] = sum_u log p_u[m_u]`` is a sum of per-partition terms, so the K best full addresses
only ever extend the K best prefixes with one of the K best entries of the next partition: keeping
K beams per partition is exact, and no M-sized vector is built (M can be 2**62).

The tie rule, the same on every path and kernel (the naive path's dense top-K, this beam search,
the Triton decoder and the fused decoding step): slots are ranked by their score
``s[m] = sum_u x_u[m_u]``, the partition entries of ``x`` summed from the first partition in the
compute dtype, and among equal scores the lower slot index ``m`` (before CAPE) comes first. Since
``log rho[m] = s[m] / tau`` minus a constant of the row (each partition's log-normaliser) and
tau > 0, this is the top-K of ``rho``; unlike the log-probabilities it involves no division by tau
and no exp or log (whose last bits differ between torch and Triton), so every implementation
computes the same scores. On bf16 inputs the sums are exact in fp32 and fp64 alike, so every path
and dtype picks the same slots, and the beam search below is exact under the rule (with exact sums,
a pruned prefix can never tie a kept one later).
"""

from __future__ import annotations

import torch


def partitions(x: torch.Tensor, num_partitions: int) -> torch.Tensor:
    """``[..., d_k] -> [..., U, d_p]``: the partitions' entries (the tie rule's score terms)."""
    return x.unflatten(-1, (num_partitions, x.shape[-1] // num_partitions))


def partition_log_probs(x: torch.Tensor, num_partitions: int, tau: float) -> torch.Tensor:
    """``[..., d_k] -> [..., U, d_p]``: log-softmax of each partition at temperature ``tau``."""
    return torch.log_softmax(partitions(x, num_partitions) / tau, dim=-1)


def beam_topk(x: torch.Tensor, num_partitions: int, topk: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[..., K]`` (int64, first partition most significant) and weights ``[..., K]``, in
    the order of the tie rule (module docstring): decreasing score, then increasing index.

    Weights are differentiable: ``exp`` of the gathered sum of per-partition log-probabilities, so
    d rho[m] / d p_u[j] = rho[m] / p_u[j] where m_u = j. Computed in ``x``'s dtype; callers pass
    fp32 or fp64.
    """
    entries = partitions(x, num_partitions)
    logp = torch.log_softmax(entries / tau, dim=-1)
    d_p = logp.shape[-1]
    per_part = min(topk, d_p)
    entry = torch.arange(d_p, device=x.device).expand(entries.shape)
    part_pick = best_of(entries.detach(), entry, per_part)
    part_scores, part_index = entries.detach().gather(-1, part_pick), part_pick  # [..., U, k']: ranks only
    scores, index = part_scores[..., 0, :], part_index[..., 0, :]
    for u in range(1, num_partitions):
        cand_scores = (scores.unsqueeze(-1) + part_scores[..., u, None, :]).flatten(-2)  # [..., beams * k']
        cand_index = (index.unsqueeze(-1) * d_p + part_index[..., u, None, :]).flatten(-2)
        pick = best_of(cand_scores, cand_index, min(topk, cand_scores.shape[-1]))
        scores, index = cand_scores.gather(-1, pick), cand_index.gather(-1, pick)
    # The rule's order: increasing index, then a stable sort by decreasing score.
    index, by_index = index.sort(dim=-1)
    index = index.gather(-1, scores.gather(-1, by_index).sort(dim=-1, descending=True, stable=True).indices)
    # The weights: the log-probabilities of each slot's entries (its base-d_p digits), summed from the first.
    digits, rest = [], index
    for _ in range(num_partitions):
        digits.append(rest % d_p)
        rest = rest // d_p
    log_w = logp[..., 0, :].gather(-1, digits[-1])
    for u in range(1, num_partitions):
        log_w = log_w + logp[..., u, :].gather(-1, digits[-1 - u])
    return index, log_w.exp()


def best_of(scores: torch.Tensor, index: torch.Tensor, keep: int) -> torch.Tensor:
    """Positions ``[..., keep]`` (in any order) of the ``keep`` best of the candidates ``scores,
    index [..., C]`` (distinct indices) by the tie rule: decreasing score, then increasing index.

    ``torch.topk`` leaves open which of equal scores it takes, which matters only where a score equal
    to the keep-th largest is left out (a tie across the cut): those rows, rare but for exact ties,
    are redone by sorting by index and then stably by score."""
    best, positions = scores.topk(keep, dim=-1)
    cut = (scores >= best[..., -1:]).sum(-1) > keep
    if traced(scores):  # a traced or captured step must not read the device: every row is redone, tied
        return torch.where(cut[..., None], _by_rule(scores, index, keep), positions)  # ones kept
    if bool(cut.any()):
        positions[cut] = _by_rule(scores[cut], index[cut], keep)
    return positions


def traced(x: torch.Tensor) -> bool:
    """Whether this runs under torch.compile or inside a CUDA graph capture (``torch.cuda.graph``),
    where reading a device value on the host is not allowed (nor a first NVRTC compile: ``cuda.py``)."""
    return torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _by_rule(scores: torch.Tensor, index: torch.Tensor, keep: int) -> torch.Tensor:
    """Positions of the ``keep`` best candidates by sorting: by increasing index, then stably by
    decreasing score."""
    by_index = index.sort(dim=-1).indices
    order = scores.gather(-1, by_index).sort(dim=-1, descending=True, stable=True).indices[..., :keep]
    return by_index.gather(-1, order)
