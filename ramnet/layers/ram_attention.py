"""RAM attention as a token mixer with flash-linear-attention's layer signature."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..accounting import ram_state
from ..ops.ram.spec import DEFAULT_PROXY_EPS
from .memories import RAMMemory
from .padding import check_hidden_states, pack, real_tokens, unpack


class RAMProjections(nn.Module):
    """The projections of the RAM-Net mixers (``RAMAttention``, ``HybridRAMAttention``): q, k
    ``[H, d_k]``, v ``[H, d_v]`` and the output projection.

    W_q and W_k are re-parameterised per head as ``e^alpha * W'`` (``q_log_scale``,
    ``k_log_scale``): a learnable softmax temperature of the address decoder.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_k_dim: int, head_v_dim: int):
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_k_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_heads * head_k_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_heads * head_v_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_v_dim, hidden_size, bias=False)
        self.q_log_scale = nn.Parameter(torch.zeros(num_heads))
        self.k_log_scale = nn.Parameter(torch.zeros(num_heads))

    def project(self, hidden_states: torch.Tensor):
        """``q, k [B, T, H, d_k]`` (scaled by ``e^alpha``) and ``v [B, T, H, d_v]``."""
        batch, seq_len = check_hidden_states(hidden_states, self.hidden_size)
        q = self.q_proj(hidden_states).view(batch, seq_len, self.num_heads, self.head_k_dim)
        k = self.k_proj(hidden_states).view(batch, seq_len, self.num_heads, self.head_k_dim)
        v = self.v_proj(hidden_states).view(batch, seq_len, self.num_heads, self.head_v_dim)
        q = q * self.q_log_scale.exp()[:, None].to(q.dtype)
        k = k * self.k_log_scale.exp()[:, None].to(k.dtype)
        return q, k, v


class RAMAttention(RAMProjections):
    """RAM-Net's token mixer (spec section 5): q, k, v projections, K-hot addresses over
    ``M = partition_dim ** num_partitions`` slots, PDMA memory, output projection.

    ``cape`` switches CAPE on for all heads (True), none (False) or per head (a sequence of
    bools). The hyperparameters of the memory live in ``memory`` (a ``RAMMemory``).

    With a cache, a one-token step under ``torch.no_grad()`` (no padding in the step, ``mode``
    None or "recurrent") updates the cached state in place.
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
        proxy_eps: float = DEFAULT_PROXY_EPS,
        cape: bool | Sequence[bool] = False,
        mode: str | None = None,
        layer_idx: int | None = None,
    ):
        memory = RAMMemory(num_heads, head_v_dim, num_partitions, partition_dim, topk, gamma, tau, eps, proxy_eps,
                           cape, mode)
        super().__init__(hidden_size, num_heads, memory.head_k_dim, head_v_dim)
        self.memory, self.memory_slots, self.layer_idx = memory, memory.memory_slots, layer_idx
        # A plain tuple, not a buffer: it is configuration, and checkpoints need not carry it.
        self.cape_heads = memory.cape

    def state_size(self, seq_len: int | None = None) -> int:
        """Floats of state per sequence, ``H * M * (d_v + 1)`` (``ramnet.accounting``)."""
        return ram_state(self.num_heads, self.head_v_dim, self.memory_slots, self.memory.topk)[0]

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        output_attentions: bool = False,
        **kwargs,
    ):
        q, k, v = self.project(hidden_states)
        batch, seq_len = q.shape[:2]
        state = past_key_values.get_state(self.layer_idx) if past_key_values is not None else None
        keep = real_tokens(attention_mask, batch, seq_len)
        cu_seqlens = None
        if keep is not None:  # drop padding: pack the real tokens as variable-length sequences
            (q, k, v), cu_seqlens = pack(keep, q, k, v)
        o, new_state = self.memory.run(q, k, v, None, state, cu_seqlens, use_cache)
        if keep is not None:  # padded positions output zeros
            o = unpack(o, keep)
        if use_cache and past_key_values is not None:
            past_key_values.update_state(self.layer_idx, new_state, num_new_tokens=seq_len)
        o = self.o_proj(o.reshape(batch, seq_len, self.num_heads * self.head_v_dim))
        return o, None, past_key_values
