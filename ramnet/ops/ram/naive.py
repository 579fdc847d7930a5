"""The readable reference: dense M-sized addresses, dense state, one step per token.

Addresses come from the literal definitions (full product softmax, dense top-K, CAPE as a cyclic
index shift), independently of the beam search and sparse updates of the fast paths, which makes
this the oracle for tests. Memory is O(T * M); use it for small M only.
"""

from __future__ import annotations

from functools import partial

import torch

from ..address import cape_dense, dense_topk_address
from ..pdma import proxy_decay
from .common import empty_state, run_per_sequence
from .spec import RAMSpec
from .state import RAMState


def _naive_core(spec: RAMSpec, q, k, v, state: RAMState):
    seq_len = q.shape[1]
    positions = state.offset[:, None] + torch.arange(seq_len, device=q.device)  # [B, T]
    shift = positions[:, :, None] * spec.cape.long()  # [B, T, H]: zero on heads without CAPE
    write = cape_dense(dense_topk_address(k, spec.num_partitions, spec.topk, spec.tau), shift)
    read = cape_dense(dense_topk_address(q, spec.num_partitions, spec.topk, spec.tau), shift)
    gamma = spec.gamma[:, None].to(q.dtype)
    S, z = state.S, state.z
    outputs = []
    for t in range(seq_len):
        w = write[:, t]  # [B, H, M]
        decay = proxy_decay(w, gamma, spec.proxy_eps)
        S = decay[..., None] * S + w[..., None] * v[:, t, :, None, :]
        z = decay * z + w
        outputs.append(torch.einsum("bhm,bhmd->bhd", read[:, t], S / (z[..., None] + spec.eps)))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(v.shape)
    return o, RAMState(S, z, state.offset + seq_len)


def naive_forward(q, k, v, spec: RAMSpec, initial_state: RAMState | None, output_final_state: bool, cu_seqlens):
    state = initial_state if initial_state is not None else empty_state(q, v, spec, cu_seqlens)
    o, final = run_per_sequence(partial(_naive_core, spec), (q, k, v), state, cu_seqlens)
    return o, (final if output_final_state else None)
