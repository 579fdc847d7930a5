"""``SlidingWindowAttention``: causal softmax attention with RoPE, the model's full and sliding-window
attention layers (the KV memory of ``ramnet.layers.kv_window`` alone, with its own projections)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.checks import check_int, check_positive
from .kv_window import Band, KVWindow, window_attention
from .padding import check_hidden_states, real_token_mask


class SlidingWindowAttention(nn.Module):
    """Causal multi-head softmax attention with RoPE over the last ``window_size`` tokens (the
    current one included), or over all of them with ``window_size=None``; fla's layer signature.
    q, k, v are ``[H, head_dim]``; no output norm (a Transformer++ attention block)."""

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 16,
        head_dim: int = 64,
        window_size: int | None = None,
        rope_theta: float = 10000.0,
        layer_idx: int | None = None,
    ):
        super().__init__()
        if window_size is not None:
            check_int("window_size", window_size, 1)
        check_positive("rope_theta", rope_theta)
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.window_size, self.rope_theta, self.layer_idx = window_size, rope_theta, layer_idx
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        output_attentions: bool = False,
        **kwargs,
    ):
        batch, seq_len = check_hidden_states(hidden_states, self.hidden_size)
        q, k, v = (proj(hidden_states).view(batch, seq_len, self.num_heads, self.head_dim)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        keep = real_token_mask(attention_mask, batch, seq_len, q.device)
        cached = past_key_values.get_window(self.layer_idx) if past_key_values is not None else None
        ctx = KVWindow.continued(cached, k, v, None, keep)
        q_pos = ctx.positions[:, -seq_len:]
        window = self.window_size
        lower = torch.zeros_like(q_pos) if window is None else q_pos - window + 1
        # Without a cache or padding the mask is a function of token indices (one block mask per length).
        band = Band(window) if cached is None and attention_mask is None else None
        o = window_attention(q, q_pos, keep, ctx, lower, self.rope_theta, band=band)
        if use_cache and past_key_values is not None:
            # The next token attends the last S - 1 of them (all of them with no window).
            start = torch.zeros_like(ctx.seen) if window is None else ctx.seen - window + 1
            past_key_values.update_state(self.layer_idx, None, num_new_tokens=seq_len, window=ctx.retain(start))
        o = o.masked_fill(~keep[:, :, None, None], 0.0)
        return self.o_proj(o.reshape(batch, seq_len, -1)), None, past_key_values


__all__ = ["SlidingWindowAttention"]
