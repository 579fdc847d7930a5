"""CPU baseline token mixers for MQAR, with flash-linear-attention's layer signature.

Each takes ``hidden_size`` and ``layer_idx`` like an fla layer, runs
``forward(hidden_states, attention_mask=None, past_key_values=None, use_cache=False, **kw)``
and returns ``(o, None, past_key_values)``. They train and evaluate on whole sequences only
(no decoding cache, no padding: MQAR batches have neither), and each reports its recurrent
state in floats with Zoology's formula via ``state_size(seq_len)``.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.checks import check_choice, check_int


def check_dropout(name: str, p) -> float:
    """A dropout probability: a number in [0, 1) (1 would zero every activation)."""
    if isinstance(p, bool) or not isinstance(p, Real) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {p!r}")
    return float(p)


def _check_heads(hidden_size: int, num_heads) -> None:
    check_int("num_heads", num_heads, 1)
    if hidden_size % num_heads:
        raise ValueError(f"num_heads must divide hidden_size {hidden_size}, got {num_heads}")


def _check_whole_sequence(attention_mask, use_cache):
    if attention_mask is not None or use_cache:
        raise ValueError("the MQAR baseline mixers take whole, unpadded sequences: no attention_mask, no cache")


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, T, H*d] -> [B, H, T, d]`` (SDPA's layout)."""
    batch, seq_len, _ = x.shape
    return x.view(batch, seq_len, heads, -1).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, seq_len, dim = x.shape
    return x.transpose(1, 2).reshape(batch, seq_len, heads * dim)


class ZoologyAttention(nn.Module):
    """Causal multi-head softmax attention through ``F.scaled_dot_product_attention``.

    Zoology's ``MHA``: one fused q/k/v projection with bias, dropout on the attention weights
    while training, an output projection with bias, no positional encoding (the model has none:
    the short convolution of the first layer gives position). State: the KV cache, ``2 d L``.
    """

    def __init__(self, hidden_size: int, num_heads: int = 1, dropout: float = 0.0, layer_idx: int | None = None):
        super().__init__()
        _check_heads(hidden_size, num_heads)
        check_dropout("dropout", dropout)
        self.hidden_size, self.num_heads, self.dropout, self.layer_idx = hidden_size, num_heads, dropout, layer_idx
        self.qkv_proj = nn.Linear(hidden_size, 3 * hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def _attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False, **kwargs):
        _check_whole_sequence(attention_mask, use_cache)
        q, k, v = (_split_heads(x, self.num_heads) for x in self.qkv_proj(hidden_states).chunk(3, dim=-1))
        return self.out_proj(_merge_heads(self._attend(q, k, v))), None, past_key_values

    def state_size(self, seq_len: int) -> int:
        return 2 * self.hidden_size * seq_len


class ZoologySlidingWindowAttention(ZoologyAttention):
    """Causal softmax attention over the last ``window`` tokens (the current one included),
    via SDPA with a banded boolean mask. Zoology's ``SlidingAttn`` (one head, no dropout there)
    lets a token see ``block_size + 1`` tokens; here ``window`` counts them all. State: the
    window's keys and values, ``2 window d``."""

    def __init__(self, hidden_size: int, window: int = 64, num_heads: int = 1, dropout: float = 0.0,
                 layer_idx: int | None = None):
        super().__init__(hidden_size, num_heads=num_heads, dropout=dropout, layer_idx=layer_idx)
        self.window = check_int("window", window, 1)

    def _attend(self, q, k, v):
        seq_len = q.shape[-2]
        pos = torch.arange(seq_len, device=q.device)
        lag = pos[:, None] - pos[None, :]  # query position minus key position
        band = (lag >= 0) & (lag < self.window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=band, dropout_p=self.dropout if self.training else 0.0)

    def state_size(self, seq_len: int) -> int:
        return 2 * self.window * self.hidden_size


class BasedLinearAttention(nn.Module):
    """Causal linear attention ``o_t = sum_s phi(q_t).phi(k_s) v_s / (sum_s phi(q_t).phi(k_s) + eps)``
    over ``s <= t``, in Based's form (Zoology's ``Based`` mixer, ``train_view="quadratic"``).

    q and k are projected to ``feature_dim`` per head, v to ``hidden_size / num_heads``. Feature maps:

    - ``"taylor"`` (Based's default): the 2nd-order Taylor map of exp, whose kernel is
      ``phi(q).phi(k) = 1 + s + s^2 / 2`` with ``s = q.k / sqrt(feature_dim)``; its expanded size,
      counted as Zoology does (symmetric products once), is ``f (f + 1) / 2 + f + 1``;
    - ``"elu"``: ``phi(x) = elu(x) + 1`` (Katharopoulos et al.), expanded size ``f``.

    The kernel matrix is built directly (quadratic in T: the fast path for training at these
    lengths); the recurrent view would hold ``S [H, E, d_h]`` and ``z [H, E]``, which is the
    state Zoology counts: ``H d_h E + H E`` with ``E`` the expanded size.
    """

    FEATURE_MAPS = ("taylor", "elu")

    def __init__(self, hidden_size: int, num_heads: int = 1, feature_dim: int = 16, feature_map: str = "taylor",
                 eps: float = 1e-12, layer_idx: int | None = None):
        super().__init__()
        _check_heads(hidden_size, num_heads)
        check_choice("feature_map", feature_map, self.FEATURE_MAPS)
        check_int("feature_dim", feature_dim, 1)
        self.hidden_size, self.num_heads, self.feature_dim = hidden_size, num_heads, feature_dim
        self.feature_map, self.eps, self.layer_idx = feature_map, eps, layer_idx
        self.q_proj = nn.Linear(hidden_size, num_heads * feature_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_heads * feature_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def _kernel(self, q, k):
        """``phi(q) . phi(k)`` for all pairs: ``[B, H, T, T]``."""
        if self.feature_map == "taylor":
            s = q @ k.transpose(-1, -2) / math.sqrt(self.feature_dim)
            return 1 + s + 0.5 * s * s
        return (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False, **kwargs):
        _check_whole_sequence(attention_mask, use_cache)
        q = _split_heads(self.q_proj(hidden_states), self.num_heads)
        k = _split_heads(self.k_proj(hidden_states), self.num_heads)
        v = _split_heads(self.v_proj(hidden_states), self.num_heads)
        seq_len = q.shape[-2]
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
        a = self._kernel(q, k).masked_fill(~causal, 0.0)
        o = (a @ v) / (a.sum(-1, keepdim=True) + self.eps)
        return self.out_proj(_merge_heads(o)), None, past_key_values

    def expanded_size(self) -> int:
        f = self.feature_dim
        return f * (f + 1) // 2 + f + 1 if self.feature_map == "taylor" else f

    def state_size(self, seq_len: int) -> int:
        head_dim = self.hidden_size // self.num_heads
        return self.num_heads * (head_dim + 1) * self.expanded_size()
