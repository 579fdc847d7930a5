"""``HybridRAMAttention``: the hybrid quadratic-linear memory (Irie, Yau, Gershman 2025; docs/models.md)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..accounting import hybrid_state
from ..ops.checks import check_choice, check_int, check_positive
from ..ops.ram.spec import DEFAULT_PROXY_EPS
from .kv_window import Band, KVWindow, take, window_attention
from .memories import DELTANET_ACTIVATIONS, DeltaRuleMemory, RAMMemory
from .padding import check_hidden_states, pack, real_token_mask, unpack
from .ram_attention import RAMProjections

BLENDS = ("delayed_stream", "delayed_chunk", "synchronous")
MIXES = ("sum", "scalar", "vector")
FAST_WEIGHTS = ("ramnet", "deltanet")


class HybridRAMAttention(RAMProjections):
    """One token mixer, two memories (the hybrid paper's), with flash-linear-attention's signature.

    One set of q, k, v projections feeds two memories: a KV memory (causal sliding-window softmax
    attention with RoPE) and a fast-weight (FW) memory (RAM-Net, or DeltaNet to reproduce the
    paper's pairing), blended in one of three ways and mixed per head or per channel.

    Shared projections: ``q, k [H, d_k]`` with ``d_k = num_partitions * partition_dim`` (scaled per
    head by ``e^alpha`` as in ``RAMAttention``), ``v [H, d_v]``. Both memories read the same q and
    k: the softmax branch attends with ``d_k``-wide keys rather than a key width of its own,
    because sharing is the point of the hybrid (one key per token, stored once in the window)
    and attention scores are well defined at any width; ``e^alpha`` then doubles as its
    temperature. With ``fast_weight="deltanet"`` the same ``d_k`` is DeltaNet's key width (set
    ``num_partitions=1, partition_dim=d_k`` to choose it freely). ``deltanet_activation``: the
    DeltaNet memory's feature map, ``"silu"`` (the paper's: SiLU on q and k before their L2 norm,
    and on v) or ``"identity"`` (this layer before the SiLU was added); the KV memory always reads
    the raw q, k, v.

    ``window_size`` S and ``blend``:
    - ``"delayed_stream"``: KV sees the last S tokens (the current one included); a pair enters the
      FW memory when it leaves the window, so the query at position p reads the FW memory after
      the writes of tokens 0..p-S. The FW memory counts its own steps: token j is written at FW
      step j and the query of position p reads at FW step p-S (CAPE uses these steps). S = 0 is
      plain RAM-Net (no KV memory).
    - ``"delayed_chunk"``: positions are cut into chunks of S; KV is causal attention within the
      chunk, FW is read from the state after the previous chunks (no intra-chunk FW term).
    - ``"synchronous"``: every (k_t, v_t) goes to both memories; KV sees the last S tokens.

    ``mix``, each weight computed from the layer input x at every token:
    - ``"sum"``: ``o_fw + o_kv``.
    - ``"scalar"`` (the paper's dynamic mix): two independent sigmoids per head,
      ``s_fw, s_kv = sigmoid(mix_proj(x))`` (``mix_proj``: hidden -> 2H, with bias; the first H
      outputs weight the FW memory), ``o = s_fw * o_fw + s_kv * o_kv``. Independent, not ``s`` and
      ``1 - s``: a head may use both memories fully, or neither. With zero weights and biases
      ``(b, -b)`` it is a static gate ``sigmoid(b) * o_fw + (1 - sigmoid(b)) * o_kv``, the form this
      mix had before (one learned logit per head, ``mix_logit``), whose checkpoints it cannot load.
    - ``"vector"``: a sigmoid gate per channel, ``g = sigmoid(g_proj(x))``,
      ``o = g * o_fw + (1 - g) * o_kv``.
    Then a per-head RMSNorm and ``o_proj``.
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
        window_size: int = 64,
        blend: str = "synchronous",
        mix: str = "vector",
        fast_weight: str = "ramnet",
        deltanet_activation: str = "silu",
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-6,
        mode: str | None = None,
        layer_idx: int | None = None,
    ):
        check_choice("blend", blend, BLENDS)
        check_choice("mix", mix, MIXES)
        check_choice("fast_weight", fast_weight, FAST_WEIGHTS)
        check_choice("deltanet_activation", deltanet_activation, DELTANET_ACTIVATIONS)  # whatever the FW memory
        check_int("window_size", window_size, 1 if blend == "delayed_chunk" else 0)
        check_positive("rope_theta", rope_theta)
        # Checked whatever the FW memory: d_k = num_partitions * partition_dim is the key width of both.
        ram = RAMMemory(num_heads, head_v_dim, num_partitions, partition_dim, topk, gamma, tau, eps, proxy_eps,
                        cape, mode)
        super().__init__(hidden_size, num_heads, ram.head_k_dim, head_v_dim)
        self.window_size, self.blend, self.mix, self.fast_weight = window_size, blend, mix, fast_weight
        self.deltanet_activation = deltanet_activation
        self.rope_theta, self.layer_idx = rope_theta, layer_idx
        self.cape = ram.cape  # one bool per head, as in RAMAttention
        self.memory_slots, self.topk = ram.memory_slots, topk

        if fast_weight == "deltanet":
            self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
            self.memory = DeltaRuleMemory(num_heads, ram.head_k_dim, head_v_dim, deltanet_activation)
        else:
            self.memory = ram
        if mix == "scalar":
            self.mix_proj = nn.Linear(hidden_size, 2 * num_heads, bias=True)
        elif mix == "vector":
            self.g_proj = nn.Linear(hidden_size, num_heads * head_v_dim, bias=True)
        self.o_norm = nn.RMSNorm(head_v_dim, eps=norm_eps)

    def state_size(self, seq_len: int | None = None) -> int:
        """Floats of state per sequence: the fast weights plus the key/value window
        (``ramnet.accounting``'s formula for a hybrid layer)."""
        return hybrid_state(self.num_heads, self.head_k_dim, self.head_v_dim, self.memory_slots, self.topk,
                            self.window_size, self.blend, self.fast_weight)[0]

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        output_attentions: bool = False,
        **kwargs,
    ):
        o_fw, o_kv, keep = self._memories(hidden_states, attention_mask, past_key_values, use_cache)
        batch, seq_len = keep.shape
        if self.mix == "sum":
            o = o_fw + o_kv
        elif self.mix == "scalar":
            weights = torch.sigmoid(self.mix_proj(hidden_states)).view(batch, seq_len, 2, self.num_heads, 1)
            o = weights[:, :, 0] * o_fw + weights[:, :, 1] * o_kv
        else:
            gate = torch.sigmoid(self.g_proj(hidden_states)).view_as(o_fw)
            o = gate * o_fw + (1 - gate) * o_kv
        o = self.o_norm(o).masked_fill(~keep[:, :, None, None], 0.0)  # padded positions output zeros
        return self.o_proj(o.reshape(batch, seq_len, -1)), None, past_key_values

    def memories(self, hidden_states, attention_mask=None, past_key_values=None, use_cache: bool = False):
        """The two memories' outputs before mixing, ``(o_fw, o_kv)``, each ``[B, T, H, d_v]``
        (zero where a memory holds nothing: o_kv with S = 0, o_fw before the first FW write)."""
        return self._memories(hidden_states, attention_mask, past_key_values, use_cache)[:2]

    def _memories(self, hidden_states, attention_mask, past_key_values, use_cache):
        batch, seq_len = check_hidden_states(hidden_states, self.hidden_size)
        q, k, v, _ = self.project(hidden_states)  # no short convolution in the hybrid
        window = self.window_size
        beta = torch.sigmoid(self.b_proj(hidden_states)) if self.fast_weight == "deltanet" else None
        keep = real_token_mask(attention_mask, batch, seq_len, q.device)

        state = cached = None
        if past_key_values is not None:
            state, cached = past_key_values.get_state(self.layer_idx), past_key_values.get_window(self.layer_idx)
        ctx = KVWindow.continued(cached, k, v, beta, keep)
        q_pos = ctx.positions[:, -seq_len:]
        save = use_cache and past_key_values is not None

        if window == 0:  # no KV memory
            o_kv = v.new_zeros(v.shape)
        else:
            lower = (q_pos // window) * window if self.blend == "delayed_chunk" else q_pos - window + 1
            band = Band(window, self.blend == "delayed_chunk") if cached is None and attention_mask is None else None
            o_kv = window_attention(q, q_pos, keep, ctx, lower, self.rope_theta, band=band)
        if self.blend == "delayed_chunk":
            o_fw, state = self._chunked_fast_weights(q, q_pos, keep, ctx, state)
            start = (ctx.seen // window) * window  # the chunk in progress, not yet written to FW
        else:
            delay = window if self.blend == "delayed_stream" else 0
            o_fw, state = self._streamed_fast_weights(q, k, v, beta, q_pos, keep, ctx, delay, state, save)
            start = ctx.seen - window  # the next token attends S - 1 of them; the delayed stream writes the oldest
        if save:
            past_key_values.update_state(self.layer_idx, state, num_new_tokens=seq_len, window=ctx.retain(start))
        return o_fw, o_kv, keep

    def _streamed_fast_weights(self, q, k, v, beta, q_pos, keep, ctx: KVWindow, delay: int, state, save: bool):
        """FW step of the query at position p writes the pair of position p - delay, if any, then
        reads. Steps with nothing to write (p < delay) come before any write, so they read the
        empty memory, which is exactly zero (S_0 = 0): they are skipped."""
        steps = keep & (q_pos >= delay)
        if not bool(steps.any()):
            return v.new_zeros(v.shape), state
        if delay > 0:
            # The window holds consecutive positions: the pair of position p sits at rank
            # p - (first position) among a row's valid columns.
            valid_first = torch.argsort((~ctx.valid).to(torch.uint8), dim=1, stable=True)
            first = torch.where(ctx.valid, ctx.positions, ctx.positions.new_tensor(2**62)).amin(1)
            rank = (q_pos - delay - first[:, None]).clamp(0, ctx.valid.shape[1] - 1)
            src = valid_first.gather(1, rank)
            k, v_write, beta = take(ctx.keys, src), take(ctx.values, src), take(ctx.betas, src)
        else:
            v_write = v
        if bool(steps.all()):
            return self.memory.run(q, k, v_write, beta, state, None, save)
        (q_p, k_p, v_p, b_p), cu_seqlens = pack(steps, q, k, v_write, beta)
        o, state = self.memory.run(q_p, k_p, v_p, b_p, state, cu_seqlens, save)
        return unpack(o, steps), state

    def _chunked_fast_weights(self, q, q_pos, keep, ctx: KVWindow, state):
        """Per chunk, in order: read its queries from the state after the previous chunks, then, if
        the chunk is complete, write all its pairs (cached ones included) with one op call. The
        loop runs once per chunk touched, and each op call materialises the full state
        ``[B, H, M, d_v]`` (kept for backward): O(T / S) state-sized tensors in training."""
        window = self.window_size
        batch, seq_len = q_pos.shape
        if state is None:
            state = self.memory.empty(batch, q)
        chunk, ctx_chunk = q_pos // window, ctx.positions // window
        rows = torch.arange(batch, device=q.device)[:, None].expand(batch, seq_len)
        o = q.new_zeros(batch, seq_len, self.num_heads, self.head_v_dim)
        for c in torch.unique(chunk[keep]).tolist():
            read = keep & (chunk == c)
            o = o.index_put((read,), self.memory.read(q[read], q_pos[read], state, rows[read]))
            write = ctx.valid & (ctx_chunk == c) & (ctx.seen >= (c + 1) * window)[:, None]
            if bool(write.any()):
                (k_w, v_w, b_w), cu_seqlens = pack(write, ctx.keys, ctx.values, ctx.betas)
                # The op reads at every step; queries are needed, the reads are discarded.
                _, state = self.memory.run(k_w, k_w, v_w, b_w, state, cu_seqlens, True)
        return o, state


__all__ = ["BLENDS", "FAST_WEIGHTS", "MIXES", "HybridRAMAttention"]
