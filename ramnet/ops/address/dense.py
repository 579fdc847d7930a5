"""Dense (M-sized) address decoding: the literal definition, used by the naive path and tests."""

from __future__ import annotations

import torch

from .beam import partition_log_probs, partitions


def dense_product_softmax(x: torch.Tensor, num_partitions: int, tau: float) -> torch.Tensor:
    """``[..., d_k] -> [..., M]``: the outer product of the partition softmaxes, flattened with the
    first partition most significant (``m = sum_u m_u * d_p**(U-1-u)``)."""
    probs = partition_log_probs(x, num_partitions, tau).exp()
    out = probs[..., 0, :]
    for u in range(1, num_partitions):
        out = (out.unsqueeze(-1) * probs[..., u, None, :]).flatten(-2)
    return out


def dense_scores(x: torch.Tensor, num_partitions: int) -> torch.Tensor:
    """``[..., d_k] -> [..., M]``: the tie rule's score ``sum_u x_u[m_u]`` of every slot (``beam.py``;
    the same order for every tau), summed from the first partition as the beam search sums it."""
    entries = partitions(x, num_partitions)
    out = entries[..., 0, :]
    for u in range(1, num_partitions):
        out = (out.unsqueeze(-1) + entries[..., u, None, :]).flatten(-2)
    return out


def dense_topk_address(x: torch.Tensor, num_partitions: int, topk: int, tau: float) -> torch.Tensor:
    """The product softmax with everything but its K largest entries set to zero (no renormalising).

    The K slots are those of the tie rule (``beam.py``): the K largest scores, and among equal
    scores the lower slot index (slots are in increasing order: a stable descending sort)."""
    rho = dense_product_softmax(x, num_partitions, tau)
    index = dense_scores(x, num_partitions).sort(dim=-1, descending=True, stable=True).indices[..., :topk]
    return torch.zeros_like(rho).scatter(-1, index, rho.gather(-1, index))


def cape_dense(address: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """CAPE on a dense address: ``[P_t(a)]_i = a[(i + t) mod M]``.

    ``address [..., M]``, ``positions`` broadcastable to ``address.shape[:-1]`` (int64).
    """
    memory_slots = address.shape[-1]
    slots = torch.arange(memory_slots, device=address.device)
    source = (slots + positions.unsqueeze(-1)) % memory_slots
    return address.gather(-1, source.expand(address.shape))
