"""The KV memory of the hybrid and attention layers: a window of recent keys and values, RoPE, and
causal softmax attention over the window.

Every layer that attends keeps its recent keys and values in a ``KVWindow``: the cached tokens
followed by the new ones, each with its absolute position (real tokens only, so padding never
counts) and a validity flag. Masks are built from positions, so the same code serves training, chunked prefill,
decoding and left-padded batches whose rows sit at different positions.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..ops.checks import compute_dtype


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

    @classmethod
    def continued(cls, cached: "KVWindow | None", keys, values, betas, keep: torch.Tensor) -> "KVWindow":
        """The ``cached`` window (None: an empty one) followed by the new tokens, as ``extend``."""
        return (cached if cached is not None else cls.empty(keys, values, betas)).extend(keys, values, betas, keep)

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
        fields = (self.keys, self.values, self.betas, self.positions, kept)
        return KVWindow(*(take(x, order) for x in fields), self.seen)


def take(x: torch.Tensor | None, columns: torch.Tensor) -> torch.Tensor | None:
    """``x [B, L, ...]`` at ``columns [B, L']`` of each row (None stays None)."""
    if x is None:
        return None
    return x.gather(1, columns.view(*columns.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE on ``x [B, T, H, d]`` at ``positions [B, T]``: channel pairs (i, i + d//2) rotate by
    ``position * theta ** (-i / (d//2))``; with an odd d the last channel is left alone. Angles in
    fp32 (fp64 for fp64 input), output in x's dtype."""
    half = x.shape[-1] // 2
    compute = compute_dtype(x.dtype)
    inv_freq = theta ** (-torch.arange(half, dtype=compute, device=x.device) / max(half, 1))
    angle = positions[..., None].to(compute) * inv_freq  # [B, T, half]
    cos, sin = angle.cos()[:, :, None], angle.sin()[:, :, None]
    x1, x2, rest = x[..., :half].to(compute), x[..., half : 2 * half].to(compute), x[..., 2 * half :]
    return torch.cat([(x1 * cos - x2 * sin).to(x.dtype), (x2 * cos + x1 * sin).to(x.dtype), rest], -1)


# FlexAttention with a block mask skips the key blocks outside every query block's window: at T = 2048
# and a window of 64, 2 of the 16 key blocks of a query block instead of all 16 (a dense T x T mask
# computes them all). Below one block of queries (decoding steps, short prompts) dense SDPA is cheaper.
FLEX_MIN_QUERIES = 128


class Band(NamedTuple):
    """``window_attention``'s mask when it depends on token indices alone: no cache and no padding, so
    that token i is at position i. Query i sees keys ``lower(i) <= j <= i``, with ``lower(i)`` 0
    (``window`` None), ``i - window + 1`` (a sliding window) or ``(i // window) * window`` (``chunked``:
    from the start of i's chunk). FlexAttention's block mask for it is built once per length (and
    device), instead of on every forward from the positions (a T x T evaluation each time)."""

    window: int | None
    chunked: bool = False

    def lower(self, i):
        if self.window is None:
            return i * 0
        return (i // self.window) * self.window if self.chunked else i - self.window + 1


def window_attention(q, q_pos, keep, ctx: KVWindow, lower: torch.Tensor, theta: float,
                     kernel: str | None = None, band: Band | None = None) -> torch.Tensor:
    """Causal softmax attention of the T new queries ``q [B, T, H, d]`` over the window ``ctx``
    (whose last T columns are the new tokens): query i sees the real keys at positions
    ``lower[i] <= p <= q_pos[i]``. RoPE on both sides; returns ``[B, T, H, d_v]``.

    ``kernel``: ``"sdpa"`` (a dense boolean mask, O(T * (W + T)) per row: the reference),
    ``"flex"`` (FlexAttention with the same mask as a block mask; compiled on CUDA), or None: flex
    on CUDA from ``FLEX_MIN_QUERIES`` queries on, sdpa otherwise. ``band``, given by a caller that
    has neither a cache nor padding, says the same mask by token index (``Band``): flex then reuses
    one block mask per length.
    """
    if kernel not in (None, "sdpa", "flex"):
        raise ValueError(f"kernel must be None, 'sdpa' or 'flex', got {kernel!r}")
    seq_len = q.shape[1]
    if kernel is None:
        kernel = "flex" if q.is_cuda and seq_len >= FLEX_MIN_QUERIES else "sdpa"
    q = rotary(q, q_pos, theta).transpose(1, 2)
    k = rotary(ctx.keys, ctx.positions, theta).transpose(1, 2)
    v = ctx.values.transpose(1, 2)
    if kernel == "flex":
        if band is not None:
            if k.shape[2] != seq_len:
                raise ValueError(f"band: a Band mask needs the window to hold only the {seq_len} new tokens "
                                 f"(no cache), got {k.shape[2]}")
            block_mask = _band_block_mask(band, seq_len, q.device)
            return _flex_attention(q.is_cuda)(q, k, v, block_mask=block_mask).transpose(1, 2)
        return _flex_window(q, k, v, q_pos, keep, ctx, lower).transpose(1, 2)
    pos = ctx.positions[:, None, :]
    allowed = ctx.valid[:, None, :] & (pos <= q_pos[:, :, None]) & (pos >= lower[:, :, None])
    # A padding query sees only itself: no mask row is empty, which SDPA kernels treat differently
    # (zeros on CPU, arbitrary values on CUDA). Its output is dropped anyway.
    own = torch.eye(seq_len, dtype=torch.bool, device=q.device)
    allowed[:, :, -seq_len:] |= own & ~keep[:, :, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None]).transpose(1, 2)


def _flex_window(q, k, v, q_pos, keep, ctx: KVWindow, lower):
    """``window_attention``'s mask as a FlexAttention block mask (q, k, v ``[B, H, *, d]``, rotated)."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, _, seq_len, _ = q.shape
    own_offset = k.shape[2] - seq_len  # the new tokens are the window's last T columns
    positions, valid = ctx.positions, ctx.valid

    def allowed(b, h, qi, kj):
        p = positions[b, kj]
        seen = valid[b, kj] & (p <= q_pos[b, qi]) & (p >= lower[b, qi])
        return seen | ((kj == qi + own_offset) & ~keep[b, qi])  # a padding query sees only itself

    block_mask = create_block_mask(allowed, batch, None, seq_len, k.shape[2], device=q.device)
    return _flex_attention(q.is_cuda)(q, k, v, block_mask=block_mask)


@functools.lru_cache(maxsize=32)
def _band_block_mask(band: Band, seq_len: int, device: torch.device):
    """The block mask of ``band`` over ``seq_len`` tokens, for every batch row and head."""
    from torch.nn.attention.flex_attention import create_block_mask

    def allowed(b, h, qi, kj):
        return (kj <= qi) & (kj >= band.lower(qi))

    return create_block_mask(allowed, None, None, seq_len, seq_len, device=device)


def _flex_attention(compiled: bool):
    """FlexAttention, compiled for CUDA (uncompiled it runs its slow reference, as on the CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    return _compiled_flex_attention() if compiled else flex_attention


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


__all__ = ["Band", "KVWindow", "rotary", "take", "window_attention"]
