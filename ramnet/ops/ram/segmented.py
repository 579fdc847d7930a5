"""Time-split RAM attention: a long sequence cut into ``segments`` pieces that run side by side.

Why: a training path runs one program (or one scan) per (sequence, head[, value slice]), so one long
sequence (B = 1, T = 32768) keeps a few dozen programs busy and the GPU mostly idle. PDMA's state
update is affine in the state, slot by slot,

    S_t = (1 - w_t)^gamma * S_{t-1} + w_t v_t,     z_t = (1 - w_t)^gamma * z_{t-1} + w_t,

so a segment maps its incoming state (S, z) to ``P * (S, z) + (F, Z)``, with ``P [M]`` the product of
the segment's decay factors per slot and ``(F, Z)`` what it writes into an empty memory; neither depends
on the incoming state. Hence three steps, each parallel over B x segments:

1. every segment from an empty memory, its final state only: two extra value columns give ``P`` (value
   0, starting at 1) and ``Z`` (value 1, starting at 0) from the path's own recurrence, so the path's
   forward and its proxy gradient of the decay (docs/ops.md) apply to them unchanged;
2. the segments' incoming states, one after the other: ``S_j+1 = P_j * S_j + F_j`` (the only sequential
   part: ``segments`` element-wise steps over ``[B, H, M, d_v]``);
3. every segment again from its incoming state, for the outputs (the reads divide by z, so a segment's
   outputs are not affine in its incoming state: they must be recomputed).

Twice the path's work and ``segments`` copies of the state (``B x H x M x (d_v + 1)`` each) in exchange
for ``segments`` times the parallelism. Gradients flow through both calls and the scan by autograd.
CAPE continues from each segment's absolute position (its initial state's ``offset``).
"""

from __future__ import annotations

import torch

from .spec import RAMSpec
from .state import RAMState


def segmented_forward(path, q, k, v, spec: RAMSpec, initial_state: RAMState | None, output_final_state: bool,
                      segments: int):
    """``path``'s ``(o, final_state)`` for ``[B, T, ...]`` inputs computed over ``segments`` pieces of
    ``T / segments`` tokens (``segments`` divides T; no packed sequences). Same signature and result as
    ``path`` up to rounding."""
    batch, seq_len, heads, d_k = q.shape
    d_v, length, memory_slots = v.shape[-1], seq_len // segments, spec.memory_slots
    pieces = batch * segments

    def split(x):  # [B, T, H, d] -> [B * segments, T / segments, H, d]: a view, no copy
        return x.reshape(pieces, length, heads, x.shape[-1])

    start = initial_state.offset if initial_state is not None else q.new_zeros(batch, dtype=torch.long)
    offsets = (start[:, None] + torch.arange(segments, device=q.device) * length).reshape(pieces)

    # 1. Each segment from an empty memory: F (the value columns), P and Z (the two extra columns).
    extra = torch.zeros(batch, seq_len, heads, 2, dtype=v.dtype, device=v.device)
    extra[..., 1] = 1.0
    empty = torch.zeros(pieces, heads, memory_slots, d_v + 2, dtype=v.dtype, device=v.device)
    empty[..., d_v] = 1.0
    # Its own z starts at 1 (any positive value: the reads it feeds are dropped).
    _, ends = path(split(q), split(k), split(torch.cat([v, extra], dim=-1)), spec,
                   RAMState(empty, torch.ones(pieces, heads, memory_slots, dtype=v.dtype, device=v.device), offsets),
                   True, None)
    ends = ends.S.reshape(batch, segments, heads, memory_slots, d_v + 2)
    written, decay, normaliser = ends[..., :d_v], ends[..., d_v], ends[..., d_v + 1]

    # 2. The incoming state of every segment.
    if initial_state is None:
        initial_state = RAMState.empty(batch, heads, memory_slots, d_v, dtype=v.dtype, device=v.device)
    state, z, incoming, incoming_z = initial_state.S, initial_state.z, [], []
    for j in range(segments):
        incoming.append(state)
        incoming_z.append(z)
        state = decay[:, j, ..., None] * state + written[:, j]
        z = decay[:, j] * z + normaliser[:, j]

    # 3. Each segment from its incoming state, for the outputs.
    o, _ = path(split(q), split(k), split(v), spec,
                RAMState(torch.stack(incoming, 1).reshape(pieces, heads, memory_slots, d_v),
                         torch.stack(incoming_z, 1).reshape(pieces, heads, memory_slots), offsets),
                False, None)
    final = RAMState(state, z, start + seq_len) if output_final_state else None
    return o.reshape(batch, seq_len, heads, d_v), final
