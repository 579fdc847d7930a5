"""Segment-sorted PDMA with the reads fused, on the event-walking Triton kernels of
``triton_kernels``: the autograd Function and its launch shape (tuned on an H200 with
``benchmarks/tune_kernels.py``)."""

from __future__ import annotations

import torch
import triton

from ..autograd_support import first_order_backward, without_autocast
from . import triton_kernels as kernels

GROUP = 8  # events per unrolled group; also the spacing of the states saved for the backward
TARGET_PROGRAMS = 16384  # chunks per launch to aim for: several waves of 1-warp programs
MAX_CHUNK = 4096
CARRY_GROUP = 32  # chunks composed per step of the carry pass
NUM_WARPS = 1


def _chunk_size(rows: int, events: int) -> int:
    """Events per chunk: short rows get the smallest chunks (more programs), long ones longer
    chunks (a shorter carry pass)."""
    size = triton.next_power_of_2(max(1, triton.cdiv(rows * events, TARGET_PROGRAMS)))
    return max(GROUP, min(MAX_CHUNK, size))


class _TritonSegmentPDMA(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, decay, write_w, read_w, v, h0, perm, start, sidx, final_rows, empty_z, eps):
        batch, seq_len, heads, topk = decay.shape
        d_v = v.shape[-1]
        rows, events = perm.shape
        chunk = _chunk_size(rows, events)
        chunks = triton.cdiv(events, chunk)
        dv_pad = triton.next_power_of_2(d_v)
        dev = v.device
        agg = torch.empty(rows, chunks, d_v + 2, dtype=torch.float32, device=dev)
        carry = torch.empty(rows, chunks, d_v + 1, dtype=torch.float32, device=dev)
        group_state = torch.empty(rows, chunks * (chunk // GROUP), d_v + 1, dtype=torch.float32, device=dev)
        # Every read event writes its own row (the sort is a permutation of all events): no memset.
        out = torch.empty(batch, seq_len, heads, topk, d_v, dtype=torch.float32, device=dev)
        final = None
        if final_rows:
            final = h0.clone() if h0 is not None else empty_rows(final_rows, d_v, empty_z, dev)
        h0_arg = h0 if h0 is not None else agg  # never read without HAS_H0
        sidx_arg = sidx if sidx is not None else perm
        events_args = (perm, start, decay, write_w, read_w, v, h0_arg, sidx_arg)
        shape_args = (events, seq_len, heads, d_v, chunks, empty_z)
        common = dict(K=topk, DV=dv_pad, CH=chunk, G=GROUP, HAS_H0=h0 is not None, num_warps=NUM_WARPS)
        kernels.fwd_aggregate_kernel[(rows, chunks)](*events_args, agg, *shape_args, **common)
        kernels.carry_kernel[(rows,)](agg, carry, chunks, d_v, DV=dv_pad, REVERSE=False, G_CARRY=CARRY_GROUP)
        kernels.fwd_output_kernel[(rows, chunks)](
            *events_args, carry, group_state, out, final if final is not None else out, *shape_args, eps,
            STORE_FINAL=final is not None, **common)
        ctx.save_for_backward(decay, write_w, read_w, v, h0, perm, start, sidx, group_state)
        ctx.config = (chunk, chunks, empty_z, eps)
        return out.sum(3), final

    @staticmethod
    @first_order_backward
    def backward(ctx, grad_o, grad_final):
        decay, write_w, read_w, v, h0, perm, start, sidx, group_state = ctx.saved_tensors
        chunk, chunks, empty_z, eps = ctx.config
        batch, seq_len, heads, topk = decay.shape
        d_v = v.shape[-1]
        rows, events = perm.shape
        dv_pad = triton.next_power_of_2(d_v)
        dev = v.device
        grad_o = grad_o.contiguous()
        has_grad_final = grad_final is not None
        if has_grad_final:
            grad_final = grad_final.contiguous().float()
        agg = torch.empty(rows, chunks, d_v + 2, dtype=torch.float32, device=dev)
        grad_carry = torch.empty(rows, chunks, d_v + 1, dtype=torch.float32, device=dev)
        # Each event writes its own entries, as in the forward.
        grad_decay = torch.empty_like(decay)
        grad_write_w = torch.empty_like(write_w)
        grad_read_w = torch.empty_like(read_w)
        grad_v_events = torch.empty(batch, seq_len, heads, topk, d_v, dtype=torch.float32, device=dev)
        grad_h0 = None
        if h0 is not None:
            grad_h0 = grad_final.clone() if has_grad_final else torch.zeros_like(h0)
        h0_arg = h0 if h0 is not None else agg
        sidx_arg = sidx if sidx is not None else perm
        grad_final_arg = grad_final if has_grad_final else agg
        events_args = (perm, start, decay, write_w, read_w, v, h0_arg, sidx_arg)
        shape_args = (events, seq_len, heads, d_v, chunks, empty_z, eps)
        common = dict(K=topk, DV=dv_pad, CH=chunk, G=GROUP, HAS_H0=h0 is not None, HAS_GRAD_FINAL=has_grad_final,
                      num_warps=NUM_WARPS)
        kernels.bwd_aggregate_kernel[(rows, chunks)](
            *events_args, group_state, grad_o, grad_final_arg, agg, *shape_args, **common)
        kernels.carry_kernel[(rows,)](agg, grad_carry, chunks, d_v, DV=dv_pad, REVERSE=True, G_CARRY=CARRY_GROUP)
        kernels.bwd_output_kernel[(rows, chunks)](
            *events_args, group_state, grad_carry, grad_o, grad_final_arg, grad_decay, grad_write_w, grad_read_w,
            grad_v_events, grad_h0 if grad_h0 is not None else agg, *shape_args, **common)
        grad_v = grad_v_events.sum(3).to(v.dtype)
        return grad_decay, grad_write_w, grad_read_w, grad_v, grad_h0, None, None, None, None, None, None


def empty_rows(n: int, d_v: int, empty_z: float, device) -> torch.Tensor:
    """``n`` rows [S, z] of the empty state: S = 0, z = ``empty_z`` (fp32)."""
    rows = torch.zeros(n, d_v + 1, dtype=torch.float32, device=device)
    rows[:, d_v] = empty_z
    return rows


def segment_pdma_triton(decay, write_w, read_w, v, *, perm, start, eps, empty_z, h0=None, sidx=None,
                        final_rows: int = 0):
    """PDMA over the slot-sorted event stream of each (batch row, head), reads fused.

    In token layout: ``decay`` = (1 - w)^gamma and ``write_w`` of the K writes and ``read_w`` of
    the K reads, ``[B, T, H, K]`` fp32; ``v [B, T, H, d_v]`` (any float dtype, computed in fp32).
    Per row ``b * H + h``, the ``E = 2 T K`` events sorted by (sequence, slot), writes of a step
    before its reads: ``perm [B*H, E]`` (int32, the event's position ``t * 2K + lane``, lanes < K
    writes) and ``start [B*H, E]`` (int8, first event of a slot's segment). ``h0 [S, d_v + 1]``:
    initial [S, z] rows and ``sidx [B*H, E]`` the row of each event's slot (None: the empty state
    S = 0, z = ``empty_z``). ``final_rows`` > 0 returns the final state rows as well (``sidx``
    needed).

    Returns ``o [B, T, H, d_v]`` fp32 (= sum_k r_k S_k / (z_k + eps)) and the final rows or None;
    both differentiable w.r.t. the float inputs.
    """
    return _TritonSegmentPDMA.apply(decay.contiguous(), write_w.contiguous(), read_w.contiguous(), v.contiguous(), h0,
                                  perm, start, sidx, final_rows, empty_z, eps)
