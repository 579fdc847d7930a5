"""RAM attention as a token mixer with flash-linear-attention's layer signature."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..accounting import ram_state
from ..ops.checks import check_int
from ..ops.ram.spec import DEFAULT_PROXY_EPS
from .layer_cache import read_layer_cache, write_layer_cache
from .memories import RAMMemory
from .padding import check_hidden_states, pack, real_tokens, unpack
from .short_conv import ShortConvolution


class RAMProjections(nn.Module):
    """The projections of the RAM-Net mixers (``RAMAttention``, ``HybridRAMAttention``): q, k
    ``[H, d_k]``, v ``[H, d_v]`` and the output projection.

    W_q and W_k are re-parameterised per head as ``e^alpha * W'`` (``q_log_scale``,
    ``k_log_scale``): a learnable softmax temperature of the address decoder.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_k_dim: int, head_v_dim: int):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("head_k_dim", head_k_dim),
                            ("head_v_dim", head_v_dim)):
            check_int(name, value, 1)
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_k_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_heads * head_k_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_heads * head_v_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_v_dim, hidden_size, bias=False)
        self.q_log_scale = nn.Parameter(torch.zeros(num_heads))
        self.k_log_scale = nn.Parameter(torch.zeros(num_heads))
        self.short_conv: ShortConvolution | None = None  # RAMAttention's short_conv_size option

    def project(self, hidden_states: torch.Tensor, keep: torch.Tensor | None = None,
                history: torch.Tensor | None = None):
        """``q, k [B, T, H, d_k]`` (scaled by ``e^alpha``), ``v [B, T, H, d_v]`` and the short
        convolution's history after them (None without one). With ``short_conv`` set (RAMAttention's
        option), the flat projections are convolved over time first, continuing from ``history``,
        with padding (``keep`` False) zeroed. The caller has checked ``hidden_states``."""
        batch, seq_len = hidden_states.shape[:2]
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        if self.short_conv is not None:
            widths = (q.shape[-1], k.shape[-1], v.shape[-1])
            qkv, history = self.short_conv(torch.cat([q, k, v], dim=-1), history, keep)
            q, k, v = qkv.split(widths, dim=-1)
        q = q.view(batch, seq_len, self.num_heads, self.head_k_dim)
        k = k.view(batch, seq_len, self.num_heads, self.head_k_dim)
        v = v.view(batch, seq_len, self.num_heads, self.head_v_dim)
        q = q * self.q_log_scale.exp()[:, None].to(q.dtype)
        k = k * self.k_log_scale.exp()[:, None].to(k.dtype)
        return q, k, v, history


class RAMAttention(RAMProjections):
    """RAM-Net's token mixer (docs/models.md): q, k, v projections, K-hot addresses over
    ``M = partition_dim ** num_partitions`` slots, PDMA memory, output projection.

    ``cape`` switches CAPE on for all heads (True), none (False) or per head (a sequence of
    bools); the layer keeps it as ``cape``, one bool per head. The hyperparameters of the memory
    live in ``memory`` (a ``RAMMemory``).

    Two options from Gated DeltaNet, both off by default (the paper has neither):
    ``short_conv_size`` > 0 convolves the q, k and v projections over the last that many tokens
    (``ShortConvolution``, causal and depthwise); ``output_gate`` multiplies the per-head
    RMS-normalised read by ``silu(g_proj(x))`` before ``o_proj``, as Gated DeltaNet's gated output norm.

    The cache is a ``RAMNetCache`` or flash-linear-attention's ``Cache`` (``layer_cache``). With one,
    ``use_cache`` and a state cached, a one-token step under ``torch.no_grad()`` (no padding in the
    step, ``mode`` None, "triton" or "recurrent") updates the cached state in place through
    ``RAMMemory.step``: the fused Triton step kernel where Triton runs, else the torch recurrent
    step; no checks, no host synchronisation. The prompt goes through the op (its training paths)
    with ``output_final_state``. The convolution's last inputs are cached beside the state.
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
        short_conv_size: int = 0,
        output_gate: bool = False,
        norm_eps: float = 1e-6,
        layer_idx: int | None = None,
    ):
        if short_conv_size != 0:
            check_int("short_conv_size", short_conv_size, 2)  # 0 (off) or a kernel of >= 2 tokens
        if not isinstance(output_gate, bool):
            raise TypeError(f"output_gate must be a bool, got {output_gate!r}")
        memory = RAMMemory(num_heads, head_v_dim, num_partitions, partition_dim, topk, gamma, tau, eps, proxy_eps,
                           cape, mode)
        super().__init__(hidden_size, num_heads, memory.head_k_dim, head_v_dim)
        self.memory, self.memory_slots, self.layer_idx = memory, memory.memory_slots, layer_idx
        # A plain tuple, not a buffer: it is configuration, and checkpoints need not carry it.
        self.cape = memory.cape
        if short_conv_size:
            self.short_conv = ShortConvolution(num_heads * (2 * memory.head_k_dim + head_v_dim), short_conv_size)
        self.g_proj = self.o_norm = None
        if output_gate:
            self.g_proj = nn.Linear(hidden_size, num_heads * head_v_dim, bias=False)
            self.o_norm = nn.RMSNorm(head_v_dim, eps=norm_eps)

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
        batch, seq_len = check_hidden_states(hidden_states, self.hidden_size)
        keep = real_tokens(attention_mask, batch, seq_len)
        state, history = read_layer_cache(past_key_values, self.layer_idx)
        q, k, v, history = self.project(hidden_states, keep, history)
        if (use_cache and state is not None and seq_len == 1 and keep is None and self.memory.steps_in_place
                and not torch.is_grad_enabled()):
            # A decoding step: the cached state is updated in place, with no checks and no host
            # synchronisation (RAMMemory.step), so that the step can be captured in a CUDA graph.
            o, new_state = self.memory.step(q[:, 0], k[:, 0], v[:, 0], state)[:, None], state
        else:  # the prompt (prefill), training, padded steps: the validated op
            cu_seqlens = None
            if keep is not None:  # drop padding: pack the real tokens as variable-length sequences
                (q, k, v), cu_seqlens = pack(keep, q, k, v)
            o, new_state = self.memory.run(q, k, v, None, state, cu_seqlens, use_cache)
            if keep is not None:  # padded positions output zeros
                o = unpack(o, keep)
        if use_cache and past_key_values is not None:
            write_layer_cache(past_key_values, self.layer_idx, new_state, history, seq_len)
        if self.g_proj is not None:
            gate = self.g_proj(hidden_states).view(batch, seq_len, self.num_heads, self.head_v_dim)
            o = self.o_norm(o) * F.silu(gate)
        o = self.o_proj(o.reshape(batch, seq_len, self.num_heads * self.head_v_dim))
        return o, None, past_key_values
