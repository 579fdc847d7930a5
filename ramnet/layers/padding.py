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

    ``attention_mask`` is ``[B, T_total]``, bool or numbers that are all 0 or 1 (1 = real token,
    0 = padding); anything else is refused, an additive mask (0 for tokens, -inf or a large
    negative number for padding) with a message saying so. Hugging Face passes a mask over the
    whole context while decoding; its last T columns belong to the current tokens."""
    if attention_mask is None:
        return None
    if (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or attention_mask.shape[0] != batch
            or attention_mask.shape[1] < seq_len):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(
            f"attention_mask must be [B, T_total] with B={batch} and T_total >= T={seq_len} (1 = real token, "
            f"0 = padding), got {shape}"
        )
    if attention_mask.dtype != torch.bool:
        if attention_mask.is_complex():
            raise ValueError(f"attention_mask must be bool or hold 0 and 1, got dtype {attention_mask.dtype}")
        odd = (attention_mask != 0) & (attention_mask != 1)
        if bool(odd.any()):
            if bool((attention_mask < 0).any()):
                raise ValueError(
                    "attention_mask holds negative values: it looks like an additive mask (0 for tokens, -inf for "
                    "padding), which is not what this layer takes; pass 1 for real tokens and 0 for padding, e.g. "
                    "(mask == 0).long()"
                )
            raise ValueError(
                f"attention_mask must be bool or hold only 0 and 1 (1 = real token, 0 = padding), got the value "
                f"{attention_mask[odd][0].item()!r}"
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
