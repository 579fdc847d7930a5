"""Chunked PDMA: the state as one table of rows per (sequence, head, slot), updated once per chunk
of C tokens, no sort. The torch reference of the token-by-token Triton kernels (``token_triton.py``,
this recurrence at one token a chunk): the chunk function vectorised over (sequence, head), a
Python loop over chunks, autograd for the backward. (Chunked Triton kernels of the same function
were removed: 4.5x the slot-sorted kernels' time on an H100, docs/kernels.md.)

One chunk, per (sequence, head). Its writes e and reads ρ, C * K of each (a token's K slots are
distinct), see the pre-chunk rows ``S_old, z_old`` of their slots. With ``la = log(decay)``
(floored, ``LOG_DECAY_FLOOR``) and ``L[x, i]`` the log decay of the write at token i to the slot of
event x (0 if token i does not write that slot):

- read ρ at token t: ``P = exp(sum_{i <= t} L[ρ, i])`` and, for each earlier-or-same token
  i <= t, ``A[ρ, i] = exp(sum_{i < i' <= t} L[ρ, i']) * w_i`` (w_i the weight of token i's write
  to the slot); then ``N = P S_old + A @ v``, ``D = P z_old + sum_i A``, ``o_t = sum_j r_j N / (D + eps)``;
- the slot of write e at the chunk's end: the same with t = the last token, stored by the last
  write of each slot (one store per slot).

The interval sums are products of ``L`` with a strictly triangular 0/1 matrix, never differences
of cumulative sums (those lose the small terms next to large ones). ``L`` and the token weights
are the slot-match matrix times a token-selection matrix: dense products of size C K x C K x C.
"""

from __future__ import annotations

import math

import torch

# Floor of log(decay): a decay of exactly 0 (w = 1) becomes exp(floor), which is 0 to the
# precision of the dtype next to the new write, and keeps sums and their gradients finite.
# High enough that a product of another factor with it (the decay's gradient divides it back out,
# ``log_decay``) stays a normal float for any factor that matters (> exp(-47) in fp32).
LOG_DECAY_FLOOR = {torch.float32: -40.0, torch.float64: -80.0}
CHUNK_SIZE = 16


class _LogDecay(torch.autograd.Function):
    """``log(max(decay, exp(floor)))``, with the gradient ``grad / max(decay, exp(floor))`` everywhere:
    through the exponentials of the chunk, ``d exp(X) / d decay = exp(X - la)``, the product of the
    other decays of X, which is the true derivative also where decay is 0 (and the floor stands in
    for it)."""

    @staticmethod
    def forward(ctx, decay: torch.Tensor, floor: float):
        floored = decay.clamp_min(math.exp(floor))
        ctx.save_for_backward(floored)
        return floored.log()

    @staticmethod
    def backward(ctx, grad):
        (floored,) = ctx.saved_tensors
        return grad / floored, None


def log_decay(decay: torch.Tensor) -> torch.Tensor:
    return _LogDecay.apply(decay, LOG_DECAY_FLOOR[decay.dtype])


def chunk_pdma(write_idx, write_w, decay, read_idx, read_w, v, *, memory_slots: int, eps: float,
               initial_state=None, output_final_state: bool = False, cu_seqlens=None, chunk_size: int = CHUNK_SIZE):
    """PDMA over chunks of ``chunk_size`` tokens, reads fused.

    ``write_idx, write_w, decay, read_idx, read_w [B, T, H, K]``: the decoded tokens (slots CAPE
    shifted, ``decay = (1 - w)^gamma`` carrying its proxy gradient); ``v [B, T, H, d_v]`` in the
    compute dtype (fp32 or fp64), which the weights are cast to. ``initial_state``: ``(S [N, H, M,
    d_v], z [N, H, M])`` or None (the empty state S = 0, z = 1/M). ``cu_seqlens``: int ``[N + 1]``
    offsets of packed sequences (B = 1), else sequence n is batch row n.

    Returns ``o [B, T, H, d_v]`` and ``(S, z)`` after the last token (or None), differentiable.
    """
    batch, seq_len, heads, topk = write_idx.shape
    d_v, dtype, dev = v.shape[-1], v.dtype, v.device
    if dtype not in LOG_DECAY_FLOOR:
        raise ValueError(f"chunk_pdma computes in v's dtype, fp32 or fp64, got {dtype}")
    starts, lengths = _sequence_bounds(batch, seq_len, cu_seqlens, dev)
    num_seqs, rows = len(starts), len(starts) * heads
    S, z = _initial_table(initial_state, rows, memory_slots, d_v, dtype, dev)

    def rows_of(x):  # [B, T, H, ...] -> [B*T, H, ...], the layout chunks gather tokens from
        return x.reshape(batch * seq_len, heads, *x.shape[3:])

    tokens = [rows_of(x) for x in (write_idx, write_w.to(dtype), log_decay(decay.to(dtype)), read_idx,
                                    read_w.to(dtype), v)]
    step = torch.arange(chunk_size, device=dev)
    tok = torch.arange(chunk_size * topk, device=dev) // topk  # each event's token in its chunk
    select = (tok[:, None] == step).to(dtype)  # [CK, C]: event -> its token
    strictly_later = (step[:, None] > step).to(dtype)  # [C, C]: i'' > i'
    causal = step <= tok[:, None]  # [CK, C]: token i' at or before the event's token
    later_write = tok > tok[:, None]  # [CK, CK]: e' after e
    row = torch.arange(rows, device=dev)[:, None]
    outputs = []
    for first in range(0, int(lengths.max()) if num_seqs else 0, chunk_size):
        pos = first + step  # [C] within each sequence
        valid = pos < lengths[:, None]  # [N, C]
        flat = torch.where(valid, starts[:, None] + pos, 0)
        ws, ww, la, rs, rw, vc = (_chunk_events(x, flat, valid, fill) for x, fill in
                                  zip(tokens, (-1, 0, 0, -2, 0, 0)))  # -1 / -2: match no slot
        vc = vc.view(rows, chunk_size, d_v)
        match_r = (rs[:, :, None] == ws[:, None, :]).to(dtype)  # [R, CK reads, CK writes]
        match_w = (ws[:, :, None] == ws[:, None, :]).to(dtype)
        log_sel, w_sel = la[..., None] * select, ww[..., None] * select  # [R, CK, C]

        # Reads: decays up to the read's own token.
        L_r = torch.where(causal, match_r @ log_sel, 0)
        A_r = torch.where(causal, (L_r @ strictly_later).exp(), 0) * (match_r @ w_sel)
        P_r = L_r.sum(-1).exp()
        S_r, z_r = S[row, rs.clamp_min(0)], z[row, rs.clamp_min(0)]
        num = P_r[..., None] * S_r + A_r @ vc
        den = P_r * z_r + A_r.sum(-1)
        out = (rw[..., None] * num / (den + eps)[..., None]).view(rows, chunk_size, topk, d_v).sum(2)
        outputs.append(out.view(num_seqs, heads, chunk_size, d_v))

        # Writes: each slot at the chunk's end, stored by its last write.
        L_w = match_w @ log_sel
        A_w = (L_w @ strictly_later).exp() * (match_w @ w_sel)
        P_w = L_w.sum(-1).exp()
        S_w, z_w = S[row, ws.clamp_min(0)], z[row, ws.clamp_min(0)]
        last = (ws >= 0) & ~((match_w > 0) & later_write).any(-1)
        index = (row.expand_as(ws)[last], ws[last])
        S = S.index_put(index, (P_w[..., None] * S_w + A_w @ vc)[last])
        z = z.index_put(index, (P_w * z_w + A_w.sum(-1))[last])

    o = _to_tokens(outputs, starts, lengths, batch, seq_len, heads, d_v, v)
    if not output_final_state:
        return o, None
    return o, (S.view(num_seqs, heads, memory_slots, d_v), z.view(num_seqs, heads, memory_slots))


def _sequence_bounds(batch: int, seq_len: int, cu_seqlens, device):
    """First flat token (into ``B * T``) and length of each sequence."""
    if cu_seqlens is None:
        return torch.arange(batch, device=device) * seq_len, torch.full((batch,), seq_len, device=device)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    return cu[:-1], cu.diff()


def _initial_table(initial_state, rows: int, memory_slots: int, d_v: int, dtype, device):
    """``S [R, M, d_v]`` and ``z [R, M]`` with R = N * H (sequence-major), from the initial state or
    the empty one."""
    if initial_state is None:
        return (torch.zeros(rows, memory_slots, d_v, dtype=dtype, device=device),
                torch.full((rows, memory_slots), 1.0 / memory_slots, dtype=dtype, device=device))
    S0, z0 = initial_state
    return S0.to(dtype).reshape(rows, memory_slots, d_v), z0.to(dtype).reshape(rows, memory_slots)


def _chunk_events(x: torch.Tensor, flat: torch.Tensor, valid: torch.Tensor, fill) -> torch.Tensor:
    """The chunk's tokens ``flat [N, C]`` of ``x [B*T, H, K or d_v]`` as ``[N*H, C*K or C*d_v]``,
    ``fill`` where the token is past its sequence's end."""
    num_seqs, chunk = flat.shape
    picked = torch.where(valid[:, :, None, None], x[flat], fill)  # [N, C, H, ...]
    return picked.transpose(1, 2).reshape(num_seqs * x.shape[1], chunk * x.shape[2])


def _to_tokens(outputs, starts, lengths, batch, seq_len, heads, d_v, like):
    """The chunks' outputs ``[N, H, C, d_v]`` each, back in token layout ``[B, T, H, d_v]``."""
    o = like.new_zeros(batch * seq_len, heads, d_v)
    if outputs:
        stacked = torch.cat(outputs, dim=2).transpose(1, 2)  # [N, L, H, d_v], L = chunks * C
        pos = torch.arange(stacked.shape[1], device=o.device)
        valid = pos < lengths[:, None]
        o = o.index_put(((starts[:, None] + pos)[valid],), stacked[valid])
    return o.view(batch, seq_len, heads, d_v)
