"""The decoding path: step over time, touching only the K written and K read slots per step."""

from __future__ import annotations

from functools import partial

import torch

from ..triton_support import kernels_apply
from .common import empty_state, decode_tokens, run_per_sequence
from .spec import RAMSpec
from .state import RAMState
from .step import pdma_step_triton


def pdma_step(S, z, write_idx, write_w, decay, v, read_idx, read_w, eps: float, inplace: bool):
    """One PDMA step on sparse addresses: gather, update and scatter the K written rows of
    ``S [B, H, M, d_v]`` and ``z [B, H, M]``, then read K rows. Address tensors are ``[B, H, K]``,
    ``v [B, H, d_v]``. Returns ``(S, z, o [B, H, d_v])``; ``inplace`` updates S and z in place
    (no autograd), otherwise new tensors are returned so gradients flow."""
    d_v = S.shape[-1]
    rows = write_idx[..., None].expand(*write_idx.shape, d_v)
    new_S = decay[..., None] * S.gather(2, rows) + write_w[..., None] * v[:, :, None, :]
    new_z = decay * z.gather(2, write_idx) + write_w
    if inplace:
        S.scatter_(2, rows, new_S)
        z.scatter_(2, write_idx, new_z)
    else:
        S = S.scatter(2, rows, new_S)
        z = z.scatter(2, write_idx, new_z)
    read_rows = S.gather(2, read_idx[..., None].expand(*read_idx.shape, d_v))
    read_z = z.gather(2, read_idx)
    o = (read_w[..., None] * read_rows / (read_z[..., None] + eps)).sum(2)
    return S, z, o


def _recurrent_core(spec: RAMSpec, q, k, v, state: RAMState):
    seq_len = q.shape[1]
    positions = state.offset[:, None] + torch.arange(seq_len, device=q.device)
    inputs = (q, k, v, state.S, state.z)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    # Decoding on CUDA: the Triton decoder, then one kernel launch per step.
    use_kernels = not needs_grad and kernels_apply(q)
    write_idx, write_w, decay, read_idx, read_w = decode_tokens(q, k, spec, positions, use_triton=use_kernels)
    S, z = state.S, state.z
    if not needs_grad and not spec.inplace_state:  # one copy, then every step updates K rows in place
        S, z = S.clone(), z.clone()
    outputs = []
    for t in range(seq_len):
        step = (write_idx[:, t], write_w[:, t], decay[:, t], v[:, t], read_idx[:, t], read_w[:, t])
        if use_kernels:
            outputs.append(pdma_step_triton(S, z, *step, spec.eps))
            continue
        S, z, o = pdma_step(S, z, *step, spec.eps, inplace=not needs_grad)
        outputs.append(o)
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(v.shape)
    return o, RAMState(S, z, state.offset + seq_len)


def recurrent_forward(q, k, v, spec: RAMSpec, initial_state: RAMState | None, output_final_state: bool, cu_seqlens):
    state = initial_state if initial_state is not None else empty_state(q, v, spec, cu_seqlens)
    o, final = run_per_sequence(partial(_recurrent_core, spec), (q, k, v), state, cu_seqlens)
    if spec.inplace_state:  # S and z were updated in place (per-sequence views included)
        state.offset.copy_(final.offset)
        return o, state
    return o, (final if output_final_state else None)
