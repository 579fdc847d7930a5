"""Hybrid quadratic-linear memory (spec section 9; Irie, Yau, Gershman 2025) and plain softmax attention.

``HybridRAMAttention`` feeds one set of q, k, v projections to two memories: a KV memory (causal
sliding-window softmax attention with RoPE) and a fast-weight (FW) memory (RAM-Net, or DeltaNet to
reproduce the paper's pairing), blended in one of three ways and mixed per head or per channel.
``SlidingWindowAttention`` is the KV memory alone with its own projections (the model's full and
sliding-window attention layers).

Every layer here keeps its recent keys and values in a ``KVWindow``: the cached tokens followed by
the new ones, each with its absolute position (real tokens only, so padding never counts) and a
validity flag. Masks are built from positions, so the same code serves training, chunked prefill,
decoding and left-padded batches whose rows sit at different positions.
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import RAMState, address_decode, ram_attention
from ..ops.address import cape_shift
from ..ops.checks import check_topk, memory_geometry
from .ram_attention import RAMAttention

BLENDS = ("delayed_stream", "delayed_chunk", "synchronous")
MIXES = ("sum", "scalar", "vector")
FAST_WEIGHTS = ("ramnet", "deltanet")


class KVWindow(NamedTuple):
    """Keys and values a layer keeps for later tokens, one row per sequence.

    ``keys [B, W, H, d_k]`` (before RoPE: rotated on use, at their ``positions``), ``values
    [B, W, H, d_v]``, ``betas [B, W, H]`` (DeltaNet's write strengths, else None), ``positions
    [B, W]`` (int64, absolute position among the sequence's real tokens), ``valid [B, W]`` (False
    on empty slots: rows hold different numbers of tokens) and ``seen [B]`` (real tokens consumed).
    """

    keys: torch.Tensor
    values: torch.Tensor
    betas: torch.Tensor | None
    positions: torch.Tensor
    valid: torch.Tensor
    seen: torch.Tensor

    @classmethod
    def empty(cls, keys: torch.Tensor, values: torch.Tensor, betas: torch.Tensor | None) -> "KVWindow":
        """A window with no tokens, shaped like the given ``[B, T, ...]`` inputs."""
        batch, device = keys.shape[0], keys.device
        return cls(
            keys[:, :0], values[:, :0], None if betas is None else betas[:, :0],
            torch.zeros(batch, 0, dtype=torch.long, device=device),
            torch.zeros(batch, 0, dtype=torch.bool, device=device),
            torch.zeros(batch, dtype=torch.long, device=device),
        )

    def extend(self, keys, values, betas, keep: torch.Tensor) -> "KVWindow":
        """Append T new tokens (``keep [B, T]`` marks the real ones; padding gets no position)."""
        positions = self.seen[:, None] + keep.long().cumsum(-1) - 1
        return KVWindow(
            torch.cat([self.keys, keys], 1),
            torch.cat([self.values, values], 1),
            None if betas is None else torch.cat([self.betas, betas], 1),
            torch.cat([self.positions, positions], 1),
            torch.cat([self.valid, keep], 1),
            self.seen + keep.sum(-1),
        )

    def retain(self, start: torch.Tensor) -> "KVWindow":
        """Keep each row's real tokens at positions >= ``start [B]``, right-aligned in time order,
        in as few columns as the fullest row needs."""
        kept = self.valid & (self.positions >= start[:, None])
        order = torch.argsort(kept.to(torch.uint8), dim=1, stable=True)  # dropped first, kept last, in order
        order = order[:, order.shape[1] - int(kept.sum(-1).max()) :]

        def take(x):
            return None if x is None else x.gather(1, order.view(*order.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))

        return KVWindow(take(self.keys), take(self.values), take(self.betas), take(self.positions), take(kept), self.seen)


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE on ``x [B, T, H, d]`` at ``positions [B, T]``: channel pairs (i, i + d//2) rotate by
    ``position * theta ** (-i / (d//2))``; with an odd d the last channel is left alone. Angles in
    fp32 (fp64 for fp64 input), output in x's dtype."""
    half = x.shape[-1] // 2
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = theta ** (-torch.arange(half, dtype=compute, device=x.device) / max(half, 1))
    angle = positions[..., None].to(compute) * inv_freq  # [B, T, half]
    cos, sin = angle.cos()[:, :, None], angle.sin()[:, :, None]
    x1, x2, rest = x[..., :half].to(compute), x[..., half : 2 * half].to(compute), x[..., 2 * half :]
    return torch.cat([(x1 * cos - x2 * sin).to(x.dtype), (x2 * cos + x1 * sin).to(x.dtype), rest], -1)


def window_attention(q, q_pos, keep, ctx: KVWindow, lower: torch.Tensor, theta: float) -> torch.Tensor:
    """Causal softmax attention of the T new queries ``q [B, T, H, d]`` over the window ``ctx``
    (whose last T columns are the new tokens): query i sees the real keys at positions
    ``lower[i] <= p <= q_pos[i]``. RoPE on both sides; returns ``[B, T, H, d_v]``.

    The boolean mask costs O(T * (W + T)) per row: a CPU reference, not a windowed kernel.
    """
    seq_len = q.shape[1]
    pos = ctx.positions[:, None, :]
    allowed = ctx.valid[:, None, :] & (pos <= q_pos[:, :, None]) & (pos >= lower[:, :, None])
    # A padding query sees only itself, so that no mask row is empty (its output is dropped).
    own = torch.eye(seq_len, dtype=torch.bool, device=q.device)
    allowed[:, :, -seq_len:] |= own & ~keep[:, :, None]
    q = rotary(q, q_pos, theta).transpose(1, 2)
    k = rotary(ctx.keys, ctx.positions, theta).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, ctx.values.transpose(1, 2), attn_mask=allowed[:, None])
    return o.transpose(1, 2)


def _pack(mask: torch.Tensor, *xs):
    """The entries of ``[B, T, ...]`` tensors where ``mask [B, T]``, packed as ``[1, n, ...]``
    variable-length sequences (one per row, possibly empty), and their ``cu_seqlens``."""
    cu_seqlens = F.pad(mask.sum(-1).cumsum(0), (1, 0))
    return [None if x is None else x[mask][None] for x in xs], cu_seqlens


class RAMMemory:
    """RAM-Net as the fast-weight memory: ``ram_attention`` to write (and read what was just
    written), plus a read-only access to a state, which the op has no way to express (every
    step of the op writes)."""

    def __init__(self, num_heads, head_v_dim, num_partitions, partition_dim, topk, gamma, tau, eps, proxy_eps,
                 cape: tuple[bool, ...], mode):
        self.num_heads, self.head_v_dim = num_heads, head_v_dim
        self.num_partitions, self.memory_slots, self.topk = num_partitions, partition_dim**num_partitions, topk
        self.gamma, self.tau, self.eps, self.proxy_eps, self.cape, self.mode = gamma, tau, eps, proxy_eps, cape, mode

    def empty(self, batch: int, like: torch.Tensor) -> RAMState:
        compute = torch.float64 if like.dtype == torch.float64 else torch.float32
        return RAMState.empty(batch, self.num_heads, self.memory_slots, self.head_v_dim, dtype=compute, device=like.device)

    def run(self, q, k, v, beta, state, cu_seqlens, output_final_state: bool):
        """Write every (k_t, v_t) and read with q_t after the write (beta is DeltaNet's; unused)."""
        return ram_attention(
            q, k, v,
            num_partitions=self.num_partitions, topk=self.topk, gamma=self.gamma, tau=self.tau, eps=self.eps,
            proxy_eps=self.proxy_eps, cape=self.cape, initial_state=state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, mode=self.mode,
        )

    def read(self, q: torch.Tensor, positions: torch.Tensor, state: RAMState, rows: torch.Tensor) -> torch.Tensor:
        """Read ``q [N, H, d_k]`` (CAPE at ``positions [N]``) from the states of ``rows [N]``:
        ``sum_k r_k S[i_k] / (z[i_k] + eps)``, touching only the K slots read."""
        compute = state.S.dtype
        index, weight = address_decode(q.to(compute), num_partitions=self.num_partitions, topk=self.topk, tau=self.tau)
        cape = torch.tensor(self.cape, device=q.device)
        index = cape_shift(index[None], positions[None], cape, self.memory_slots)[0]  # [N, H, K]
        heads = torch.arange(self.num_heads, device=q.device)
        flat = (rows[:, None, None] * self.num_heads + heads[None, :, None]) * self.memory_slots + index
        values = state.S.reshape(-1, self.head_v_dim)[flat]
        norms = state.z.reshape(-1)[flat]
        return (weight[..., None] * values / (norms[..., None] + self.eps)).sum(-2).to(q.dtype)


class DeltaState(NamedTuple):
    """DeltaNet's fast weights ``S [N, H, d_k, d_v]`` (fp32, fp64 for fp64 input), fla's layout."""

    S: torch.Tensor


@cache
def _fla_chunk_delta_rule():
    try:
        from fla.ops.delta_rule import chunk_delta_rule
    except ImportError:
        return None
    return chunk_delta_rule


def delta_rule(q, k, v, beta, scale: float, S: torch.Tensor):
    """The delta rule, one step at a time: ``S <- S + k_t (beta_t (v_t - S^T k_t))^T``, then
    ``o_t = scale * S^T q_t`` (the read sees the write). ``q, k [B, T, H, d_k]`` (normalised by the
    caller), ``v [B, T, H, d_v]``, ``beta [B, T, H]``, ``S [B, H, d_k, d_v]``; all in S's dtype."""
    outputs = []
    for t in range(q.shape[1]):
        error = v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t, :, None] * error)
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outputs, 1), S


class DeltaRuleMemory:
    """DeltaNet as the fast-weight memory (the hybrid paper's choice): L2-normalised q and k, a
    write strength beta per token and head, scale ``d_k ** -0.5`` as in fla. fla's
    ``chunk_delta_rule`` on CUDA when fla is installed, the step-by-step torch rule otherwise."""

    def __init__(self, num_heads: int, head_k_dim: int, head_v_dim: int):
        self.num_heads, self.head_k_dim, self.head_v_dim = num_heads, head_k_dim, head_v_dim
        self.scale = head_k_dim**-0.5

    def empty(self, batch: int, like: torch.Tensor) -> DeltaState:
        compute = torch.float64 if like.dtype == torch.float64 else torch.float32
        return DeltaState(torch.zeros(batch, self.num_heads, self.head_k_dim, self.head_v_dim, dtype=compute, device=like.device))

    def run(self, q, k, v, beta, state, cu_seqlens, output_final_state: bool):
        dtype = v.dtype
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        q, k = (F.normalize(x.to(compute), dim=-1) for x in (q, k))
        num_seqs = q.shape[0] if cu_seqlens is None else len(cu_seqlens) - 1
        S0 = (state if state is not None else self.empty(num_seqs, v)).S
        kernel = _fla_chunk_delta_rule() if q.is_cuda else None
        if kernel is not None:
            o, final = kernel(
                q.to(dtype), k.to(dtype), v, beta.to(dtype), scale=self.scale, initial_state=S0,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens,
            )
            return o.to(dtype), (DeltaState(final) if output_final_state else None)
        v, beta = v.to(compute), beta.to(compute)
        if cu_seqlens is None:
            o, final = delta_rule(q, k, v, beta, self.scale, S0)
        else:  # one sequence at a time, each from its own state
            bounds = cu_seqlens.tolist()
            parts = [
                delta_rule(q[:, a:b], k[:, a:b], v[:, a:b], beta[:, a:b], self.scale, S0[n : n + 1])
                if b > a else (v[:, :0], S0[n : n + 1])
                for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))
            ]
            o, final = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts])
        return o.to(dtype), (DeltaState(final) if output_final_state else None)

    def read(self, q: torch.Tensor, positions: torch.Tensor, state: DeltaState, rows: torch.Tensor) -> torch.Tensor:
        """``scale * S^T q`` for ``q [N, H, d_k]`` from the states of ``rows [N]`` (positions unused)."""
        unit = F.normalize(q.to(state.S.dtype), dim=-1)
        return (self.scale * torch.einsum("nhk,nhkv->nhv", unit, state.S[rows])).to(q.dtype)


def _real_tokens(attention_mask, batch: int, seq_len: int, device) -> torch.Tensor:
    keep = RAMAttention._real_tokens(attention_mask, batch, seq_len)
    return torch.ones(batch, seq_len, dtype=torch.bool, device=device) if keep is None else keep


def _check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _check_window(window_size, minimum: int) -> None:
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < minimum:
        raise ValueError(f"window_size must be an int >= {minimum}, got {window_size!r}")


class HybridRAMAttention(nn.Module):
    """One token mixer, two memories (spec section 9), with flash-linear-attention's signature.

    Shared projections: ``q, k [H, d_k]`` with ``d_k = num_partitions * partition_dim`` (scaled per
    head by ``e^alpha`` as in ``RAMAttention``), ``v [H, d_v]``. Both memories read the same q and
    k: the softmax branch attends with ``d_k``-wide keys rather than a key width of its own,
    because sharing is the point of the hybrid (one key per token, stored once in the window)
    and attention scores are well defined at any width; ``e^alpha`` then doubles as its
    temperature. With ``fast_weight="deltanet"`` the same ``d_k`` is DeltaNet's key width (set
    ``num_partitions=1, partition_dim=d_k`` to choose it freely).

    ``window_size`` S and ``blend``:
    - ``"delayed_stream"``: KV sees the last S tokens (the current one included); a pair enters the
      FW memory when it leaves the window, so the query at position p reads the FW memory after
      the writes of tokens 0..p-S. The FW memory counts its own steps: token j is written at FW
      step j and the query of position p reads at FW step p-S (CAPE uses these steps). S = 0 is
      plain RAM-Net (no KV memory).
    - ``"delayed_chunk"``: positions are cut into chunks of S; KV is causal attention within the
      chunk, FW is read from the state after the previous chunks (no intra-chunk FW term).
    - ``"synchronous"``: every (k_t, v_t) goes to both memories; KV sees the last S tokens.

    ``mix``: ``"sum"`` (o_fw + o_kv), ``"scalar"`` (a learned sigmoid gate per head) or ``"vector"``
    (a sigmoid gate per channel from the input): ``g * o_fw + (1 - g) * o_kv``. Then a per-head
    RMSNorm and ``o_proj``.
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
        window_size: int = 64,
        blend: str = "synchronous",
        mix: str = "vector",
        fast_weight: str = "ramnet",
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-6,
        mode: str | None = None,
        layer_idx: int | None = None,
    ):
        super().__init__()
        _check_choice("blend", blend, BLENDS)
        _check_choice("mix", mix, MIXES)
        _check_choice("fast_weight", fast_weight, FAST_WEIGHTS)
        _check_window(window_size, 1 if blend == "delayed_chunk" else 0)
        if not rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {rope_theta!r}")
        head_k_dim = num_partitions * partition_dim
        _, memory_slots = memory_geometry(head_k_dim, num_partitions)
        check_topk(topk, memory_slots)
        if isinstance(cape, bool):
            cape = [cape] * num_heads
        if len(cape) != num_heads:
            raise ValueError(f"cape must be a bool or one bool per head ({num_heads}), got {len(cape)} entries")
        self.hidden_size, self.num_heads, self.head_k_dim, self.head_v_dim = hidden_size, num_heads, head_k_dim, head_v_dim
        self.window_size, self.blend, self.mix, self.fast_weight = window_size, blend, mix, fast_weight
        self.rope_theta, self.layer_idx = rope_theta, layer_idx
        self.cape_heads = tuple(bool(c) for c in cape)

        self.q_proj = nn.Linear(hidden_size, num_heads * head_k_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_heads * head_k_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_heads * head_v_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_v_dim, hidden_size, bias=False)
        self.q_log_scale = nn.Parameter(torch.zeros(num_heads))
        self.k_log_scale = nn.Parameter(torch.zeros(num_heads))
        if fast_weight == "deltanet":
            self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
            self.memory = DeltaRuleMemory(num_heads, head_k_dim, head_v_dim)
        else:
            self.memory = RAMMemory(num_heads, head_v_dim, num_partitions, partition_dim, topk, gamma, tau, eps,
                                    proxy_eps, self.cape_heads, mode)
        if mix == "scalar":
            self.mix_logit = nn.Parameter(torch.zeros(num_heads))  # sigmoid(0): both memories at 1/2
        elif mix == "vector":
            self.g_proj = nn.Linear(hidden_size, num_heads * head_v_dim, bias=True)
        self.o_norm = nn.RMSNorm(head_v_dim, eps=norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        output_attentions: bool = False,
        **kwargs,
    ):
        batch, seq_len, _ = hidden_states.shape
        o_fw, o_kv, keep = self._memories(hidden_states, attention_mask, past_key_values, use_cache)
        if self.mix == "sum":
            o = o_fw + o_kv
        else:
            if self.mix == "scalar":
                gate = torch.sigmoid(self.mix_logit)[:, None].to(o_fw.dtype)
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
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must be [B, T, {self.hidden_size}], got {tuple(hidden_states.shape)}")
        batch, seq_len, _ = hidden_states.shape
        heads, window = self.num_heads, self.window_size
        q = self.q_proj(hidden_states).view(batch, seq_len, heads, self.head_k_dim)
        k = self.k_proj(hidden_states).view(batch, seq_len, heads, self.head_k_dim)
        v = self.v_proj(hidden_states).view(batch, seq_len, heads, self.head_v_dim)
        q = q * self.q_log_scale.exp()[:, None].to(q.dtype)
        k = k * self.k_log_scale.exp()[:, None].to(k.dtype)
        beta = torch.sigmoid(self.b_proj(hidden_states)) if self.fast_weight == "deltanet" else None
        keep = _real_tokens(attention_mask, batch, seq_len, q.device)

        state = cached = None
        if past_key_values is not None:
            state, cached = past_key_values.get_state(self.layer_idx), past_key_values.get_window(self.layer_idx)
        ctx = (cached if cached is not None else KVWindow.empty(k, v, beta)).extend(k, v, beta, keep)
        q_pos = ctx.positions[:, -seq_len:]
        save = use_cache and past_key_values is not None

        if window == 0:  # no KV memory
            o_kv = v.new_zeros(v.shape)
        else:
            lower = (q_pos // window) * window if self.blend == "delayed_chunk" else q_pos - window + 1
            o_kv = window_attention(q, q_pos, keep, ctx, lower, self.rope_theta)
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

            def pick(x):
                return None if x is None else x.gather(1, src.view(*src.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))

            k, v_write, beta = pick(ctx.keys), pick(ctx.values), pick(ctx.betas)
        else:
            v_write = v
        if bool(steps.all()):
            return self.memory.run(q, k, v_write, beta, state, None, save)
        (q_p, k_p, v_p, b_p), cu_seqlens = _pack(steps, q, k, v_write, beta)
        o, state = self.memory.run(q_p, k_p, v_p, b_p, state, cu_seqlens, save)
        return v.new_zeros(v.shape).index_put((steps,), o[0]), state

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
            o = o.index_put((read,), self.memory.read(q[read], q_pos[read], state, rows[read]).to(o.dtype))
            write = ctx.valid & (ctx_chunk == c) & (ctx.seen >= (c + 1) * window)[:, None]
            if bool(write.any()):
                (k_w, v_w, b_w), cu_seqlens = _pack(write, ctx.keys, ctx.values, ctx.betas)
                # The op reads at every step; queries are needed, the reads are discarded.
                _, state = self.memory.run(k_w, k_w, v_w, b_w, state, cu_seqlens, True)
        return o, state


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
            _check_window(window_size, 1)
        if not rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {rope_theta!r}")
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
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must be [B, T, {self.hidden_size}], got {tuple(hidden_states.shape)}")
        batch, seq_len, _ = hidden_states.shape
        q, k, v = (proj(hidden_states).view(batch, seq_len, self.num_heads, self.head_dim)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        keep = _real_tokens(attention_mask, batch, seq_len, q.device)
        cached = past_key_values.get_window(self.layer_idx) if past_key_values is not None else None
        ctx = (cached if cached is not None else KVWindow.empty(k, v, None)).extend(k, v, None, keep)
        q_pos = ctx.positions[:, -seq_len:]
        window = self.window_size
        lower = torch.zeros_like(q_pos) if window is None else q_pos - window + 1
        o = window_attention(q, q_pos, keep, ctx, lower, self.rope_theta)
        if use_cache and past_key_values is not None:
            start = torch.zeros_like(ctx.seen) if window is None else ctx.seen - window + 1
            past_key_values.update_state(self.layer_idx, None, num_new_tokens=seq_len, window=ctx.retain(start))
        o = o.masked_fill(~keep[:, :, None, None], 0.0)
        return self.o_proj(o.reshape(batch, seq_len, -1)), None, past_key_values


__all__ = ["BLENDS", "FAST_WEIGHTS", "MIXES", "HybridRAMAttention", "KVWindow", "SlidingWindowAttention", "rotary"]
