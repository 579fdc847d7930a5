"""Token-by-token PDMA on the Triton kernels of ``token_triton_kernels``: the autograd Function and
its launch shape. Same arguments and results as the torch reference ``chunk.chunk_pdma`` (the chunk
function with one token a chunk is this recurrence); computes in fp32 whatever the input dtype.

Memory, besides the inputs: the state tables (``N*H*M x (d_v + slices)`` fp32; in the backward a
copy rolled back token by token and the adjoint) and, for the backward, every write's pre-write row
(``B*T*H*K x (d_v + 1)`` fp32, written by the forward only when a gradient is needed).

``onchip.py`` runs the forward and the backward as CUDA kernels over tables in shared memory and shares
the rest: ``forward_buffers``, ``finish_forward``, and this backward where its own backward's tables do
not fit (its Function subclasses ``_TokenPDMA``).
"""

from __future__ import annotations

import math

import torch
import triton

from ..autograd_support import first_order_backward, without_autocast
from . import token_triton_kernels as kernels

# The kernels take K up to this: a token's [K, K, width] slot-match tiles live in registers; beyond
# it they refuse (the slot-sorted kernels take any K).
KERNEL_MAX_TOPK = 8
# Columns of d_v per program. A program's time is the length of its sequence times the latency of
# one token (a round trip to L2 and the [K, K, width] match reductions), whatever the batch, so
# slices buy parallelism only where the (sequence, head) pairs are too few to fill the GPU.
WIDTH = 32
NUM_WARPS = 1
# L2 eviction hints: keep the tables, stream the rest (token_triton_kernels; "" for no hint).
KEEP, STREAM = "evict_last", "evict_first"


def launch_shape(d_v: int) -> tuple[int, int]:
    """``(columns per program, slices)``: slices of ``WIDTH`` columns (fewer if d_v is narrower)."""
    width = min(WIDTH, triton.next_power_of_2(d_v))
    return width, math.ceil(d_v / width)


def token_config(topk: int, d_v: int, varlen: bool) -> tuple[dict, int]:
    """The Triton kernels' compile-time constants and launch options, and the number of d_v slices
    (the rows of the z table)."""
    width, slices = launch_shape(d_v)
    config = dict(K=topk, KP=triton.next_power_of_2(topk), DS=width, VARLEN=varlen, KEEP=KEEP, STREAM=STREAM,
                  num_warps=NUM_WARPS)
    return config, slices


def forward_buffers(write_idx, v, S0, z0, memory_slots: int, num_seqs: int, slices: int, save: bool):
    """What a token forward writes: the tables ``S [N*H*M, d_v]`` and ``z [slices, N*H*M]`` filled
    with the initial state (zeros and 1/M without one), the pre-write rows' buffers (empty unless
    ``save``) and ``o [B, T, H, d_v]``, all fp32."""
    batch, seq_len, heads, _ = write_idx.shape
    d_v, dev = v.shape[-1], v.device
    table_rows = num_seqs * heads * memory_slots
    if S0 is None:
        S = torch.zeros(table_rows, d_v, dtype=torch.float32, device=dev)
        z = torch.full((slices, table_rows), 1.0 / memory_slots, dtype=torch.float32, device=dev)
    else:
        S = S0.reshape(table_rows, d_v).to(torch.float32, copy=True)
        z = z0.reshape(1, table_rows).to(torch.float32).repeat(slices, 1)
    events = write_idx.numel()
    saved_S = torch.empty(events if save else 0, d_v, dtype=torch.float32, device=dev)
    saved_z = torch.empty(events if save else 0, dtype=torch.float32, device=dev)
    o = torch.empty(batch, seq_len, heads, d_v, dtype=torch.float32, device=dev)
    return S, z, saved_S, saved_z, o


def finish_forward(ctx, token_args, S, z, saved_S, saved_z, o, config, S0, eps, num_seqs, memory_slots,
                   return_final):
    """Save what ``_TokenPDMA.backward`` reads (the tables as the forward left them, ``z`` with one
    copy per slice of ``config``) and return the Function's outputs."""
    heads, d_v = token_args[0].shape[2], S.shape[-1]
    ctx.save_for_backward(*token_args, S, z, saved_S, saved_z)
    ctx.setup = (config, S0 is not None, S0.dtype if S0 is not None else None, eps, num_seqs, memory_slots)
    if not return_final:
        return o, None, None
    return o, S.view(num_seqs, heads, memory_slots, d_v), z[0].view(num_seqs, heads, memory_slots)


class _TokenPDMA(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, write_w, decay, read_w, v, S0, z0, write_idx, read_idx, cu_seqlens, memory_slots, eps,
                return_final):
        seq_len, heads = write_idx.shape[1:3]
        d_v = v.shape[-1]
        num_seqs = write_idx.shape[0] if cu_seqlens is None else len(cu_seqlens) - 1
        rows = num_seqs * heads
        config, slices = token_config(write_idx.shape[-1], d_v, cu_seqlens is not None)
        save = any(ctx.needs_input_grad[:6])
        S, z, saved_S, saved_z, o = forward_buffers(write_idx, v, S0, z0, memory_slots, num_seqs, slices, save)
        cu = cu_seqlens if cu_seqlens is not None else write_idx  # never read without VARLEN
        token_args = (write_idx, write_w, decay, read_idx, read_w, v, cu)
        if rows:
            kernels.token_fwd_kernel[(rows, slices)](
                *token_args, S, z, saved_S, saved_z, o, seq_len, heads, memory_slots, d_v, rows * memory_slots, eps,
                SAVE=save, **config)
        return finish_forward(ctx, token_args, S, z, saved_S, saved_z, o, config, S0, eps, num_seqs, memory_slots,
                              return_final)

    @staticmethod
    @first_order_backward
    def backward(ctx, grad_o, grad_S, grad_z):
        write_idx, write_w, decay, read_idx, read_w, v, cu, S, z, saved_S, saved_z = ctx.saved_tensors
        config, has_h0, state_dtype, eps, num_seqs, memory_slots = ctx.setup
        heads, d_v = write_idx.shape[2], v.shape[-1]
        slices, table_rows = z.shape
        events = write_idx.numel()
        # The backward rolls the tables back in place: copies, so that it can run again.
        S, z = S.clone(), z.clone()
        dS = grad_S.reshape(table_rows, d_v).float().clone() if grad_S is not None else torch.zeros_like(S)
        dz = torch.zeros_like(z)
        if grad_z is not None:  # one slice carries it; the slices' z adjoints add up
            dz[0] = grad_z.reshape(table_rows)
        grads = torch.empty(3, slices, events, dtype=torch.float32, device=v.device)
        grad_v = torch.empty(v.shape, dtype=torch.float32, device=v.device)
        if table_rows:
            kernels.token_bwd_kernel[(num_seqs * heads, slices)](
                write_idx, write_w, decay, read_idx, read_w, v, cu, S, z, saved_S, saved_z, dS, dz,
                grad_o.contiguous(), grads[0], grads[1], grads[2], grad_v,
                write_idx.shape[1], heads, memory_slots, d_v, table_rows, events, eps, **config)
        return backward_results(ctx, grads, grad_v, dS, dz)


def backward_results(ctx, grads, grad_v, dS, dz):
    """The backward's returns from what its kernels leave: the slices' shares of the write weight, decay and read
    weight gradients (``grads [3, slices, events]``) and of z's adjoint (``dz [slices, N*H*M]``) summed, the
    initial state's gradients where there was one, each in its input's dtype (``_TokenPDMA`` and
    ``onchip._OnchipPDMA``)."""
    write_idx, write_w, decay, _, read_w, v = ctx.saved_tensors[:6]
    _, has_h0, state_dtype, _, num_seqs, memory_slots = ctx.setup
    heads, d_v = write_idx.shape[2], v.shape[-1]
    grad_write_w, grad_decay, grad_read_w = (g.sum(0).view(write_idx.shape) for g in grads)
    grad_S0 = grad_z0 = None
    if has_h0:
        grad_S0 = dS.view(num_seqs, heads, memory_slots, d_v).to(state_dtype)
        grad_z0 = dz.sum(0).view(num_seqs, heads, memory_slots).to(state_dtype)
    return (grad_write_w.to(write_w.dtype), grad_decay.to(decay.dtype), grad_read_w.to(read_w.dtype),
            grad_v.to(v.dtype), grad_S0, grad_z0, None, None, None, None, None, None)


def token_pdma_triton(write_idx, write_w, decay, read_idx, read_w, v, *, memory_slots: int, eps: float,
                      initial_state=None, output_final_state: bool = False, cu_seqlens=None):
    """``chunk.chunk_pdma`` on the token-by-token Triton kernels (CUDA, or CPU under
    ``TRITON_INTERPRET=1``), for K <= ``KERNEL_MAX_TOPK`` and M < 2**31. Returns ``o [B, T, H, d_v]``
    fp32 and ``(S, z)`` fp32 or None."""
    topk = write_idx.shape[-1]
    if topk > KERNEL_MAX_TOPK or memory_slots >= 2**31:
        raise ValueError(f"the token PDMA kernels take K <= {KERNEL_MAX_TOPK} and M < 2**31, got K={topk}, "
                         f"M={memory_slots}")
    S0, z0 = initial_state if initial_state is not None else (None, None)
    o, S, z = _TokenPDMA.apply(write_w.contiguous(), decay.contiguous(), read_w.contiguous(), v.contiguous(),
                               S0, z0, write_idx.contiguous(), read_idx.contiguous(), cu_seqlens, memory_slots,
                               float(eps), bool(output_final_state))
    return o, ((S, z) if output_final_state else None)
