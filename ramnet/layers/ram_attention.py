"""RAM attention as a token mixer with flash-linear-attention's layer signature."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..ops import ram_attention
from ..ops.checks import check_topk, memory_geometry


class RAMAttention(nn.Module):
    """RAM-Net's token mixer (spec section 5): q, k, v projections, K-hot addresses over
    ``M = partition_dim ** num_partitions`` slots, PDMA memory, output projection.

    W_q and W_k are re-parameterised per head as ``e^alpha * W'`` (``q_log_scale``,
    ``k_log_scale``): a learnable softmax temperature of the address decoder. ``cape`` switches
    CAPE on for all heads (True), none (False) or per head (a sequence of bools).

    With a cache, a one-token step under ``torch.no_grad()`` updates the cached state in place.
    """

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 16,
        head_v_dim: int = 64,
        num_partitions: int = 5,
        partition_dim: int = 4,
        topk: int = 8,
        gamma: float = 1.0,
        tau: float = 1.0,
        eps: float = 1e-6,
        proxy_eps: float = 1e-2,
        cape: bool | Sequence[bool] = False,
        mode: str | None = None,
        layer_idx: int | None = None,
    ):
        super().__init__()
        head_k_dim = num_partitions * partition_dim
        _, self.memory_slots = memory_geometry(head_k_dim, num_partitions)
        check_topk(topk, self.memory_slots)
        if isinstance(cape, bool):
            cape = [cape] * num_heads
        if len(cape) != num_heads:
            raise ValueError(f"cape must be a bool or one bool per head ({num_heads}), got {len(cape)} entries")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.num_partitions, self.topk = num_partitions, topk
        self.gamma, self.tau, self.eps, self.proxy_eps = gamma, tau, eps, proxy_eps
        self.mode, self.layer_idx = mode, layer_idx

        self.q_proj = nn.Linear(hidden_size, num_heads * head_k_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_heads * head_k_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_heads * head_v_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_v_dim, hidden_size, bias=False)
        self.q_log_scale = nn.Parameter(torch.zeros(num_heads))
        self.k_log_scale = nn.Parameter(torch.zeros(num_heads))
        # A plain tuple, not a buffer: it is configuration, and checkpoints need not carry it.
        self.cape_heads = tuple(bool(c) for c in cape)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        output_attentions: bool = False,
        **kwargs,
    ):
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states must be [B, T, {self.hidden_size}], got {tuple(hidden_states.shape)}"
            )
        batch, seq_len, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, seq_len, self.num_heads, self.head_k_dim)
        k = self.k_proj(hidden_states).view(batch, seq_len, self.num_heads, self.head_k_dim)
        v = self.v_proj(hidden_states).view(batch, seq_len, self.num_heads, self.head_v_dim)
        q = q * self.q_log_scale.exp()[:, None].to(q.dtype)
        k = k * self.k_log_scale.exp()[:, None].to(k.dtype)

        state = past_key_values.get_state(self.layer_idx) if past_key_values is not None else None
        keep = self._real_tokens(attention_mask, batch, seq_len)
        cu_seqlens = None
        if keep is not None:  # drop padding: pack the real tokens as variable-length sequences
            lengths = keep.sum(-1)
            cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
            q, k, v = (x[keep][None] for x in (q, k, v))

        o, new_state = ram_attention(
            q, k, v,
            num_partitions=self.num_partitions, topk=self.topk, gamma=self.gamma, tau=self.tau,
            eps=self.eps, proxy_eps=self.proxy_eps, cape=self.cape_heads, initial_state=state,
            output_final_state=use_cache, cu_seqlens=cu_seqlens, mode=self.mode,
            # Decoding: update the K touched rows of the cached state instead of copying all M.
            inplace_state=state is not None and seq_len == 1 and not torch.is_grad_enabled(),
        )
        if keep is not None:  # padded positions output zeros
            o = o.new_zeros(batch, seq_len, self.num_heads, self.head_v_dim).index_put((keep,), o[0])
        if use_cache and past_key_values is not None:
            past_key_values.update_state(self.layer_idx, new_state, num_new_tokens=seq_len)
        o = self.o_proj(o.reshape(batch, seq_len, self.num_heads * self.head_v_dim))
        return o, None, past_key_values

    @staticmethod
    def _real_tokens(attention_mask: torch.Tensor | None, batch: int, seq_len: int) -> torch.Tensor | None:
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
