"""What every token mixer does with its inputs first: check ``hidden_states``, find the real tokens of a
padded batch from ``attention_mask``, and pack them as variable-length sequences (then scatter back)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_hidden_states(hidden_states: torch.Tensor, hidden_size: int) -> tuple[int, int]:
    """``(B, T)`` of ``hidden_states [B, T, hidden_size]``."""
    if hidden_states.dim() != 3 or hidden_states.shape[-1] != hidden_size:
        raise ValueError(f"hidden_states must be [B, T, {hidden_size}], got {tuple(hidden_states.shape)}")
    return hidden_states.shape[0], hidden_states.shape[1]


def real_tokens(attention_mask: torch.Tensor | None, batch: int, seq_len: int) -> torch.Tensor | None:
    """Boolean ``[B, T]`` of the real tokens, or None when there is no padding to drop.

    Hugging Face passes a mask over the whole context while decoding; its last T columns
    belong to the current tokens."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < seq_len:
        raise ValueError(
            f"attention_mask must be [B, T_total] with B={batch} and T_total >= T={seq_len} (1 = real token, "
            f"0 = padding), got {tuple(attention_mask.shape)}"
        )
    keep = attention_mask[:, -seq_len:].bool()
    return None if bool(keep.all()) else keep


def real_token_mask(attention_mask: torch.Tensor | None, batch: int, seq_len: int, device) -> torch.Tensor:
    """``real_tokens`` as a mask in every case: all True where there is no padding."""
    keep = real_tokens(attention_mask, batch, seq_len)
    return torch.ones(batch, seq_len, dtype=torch.bool, device=device) if keep is None else keep


def pack(mask: torch.Tensor, *xs: torch.Tensor | None):
    """The entries of ``[B, T, ...]`` tensors where ``mask [B, T]``, packed as ``[1, n, ...]``
    variable-length sequences (one per row, possibly empty), and their ``cu_seqlens``.
    None stays None."""
    cu_seqlens = F.pad(mask.sum(-1).cumsum(0), (1, 0))
    return [None if x is None else x[mask][None] for x in xs], cu_seqlens


def unpack(packed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack``: ``packed [1, n, ...]`` back at ``mask [B, T]``, zeros elsewhere."""
    return packed.new_zeros(*mask.shape, *packed.shape[2:]).index_put((mask,), packed[0])
