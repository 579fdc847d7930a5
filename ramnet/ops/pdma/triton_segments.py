"""Segment-sorted PDMA with the reads fused, on the Triton kernels of ``triton_kernels``.

The autograd Function takes the sorted event stream of every (batch row, head) and the
per-token arrays in token order; see ``segment_pdma_triton``.
"""

from __future__ import annotations

import torch
import triton

from . import triton_kernels as kernels

# Launch shape (tuned on an H100 with benchmarks/tune_kernels.py).
BLOCK = 32  # events per associative scan
MAX_BLOCKS_PER_CHUNK = 8
NUM_WARPS = 2


def _layout(events: int) -> tuple[int, int]:
    """(blocks per chunk, chunks per row): long rows get long chunks, short rows several chunks
    so that short sequences still fill the GPU."""
    blocks = triton.cdiv(events, BLOCK)
    per_chunk = max(1, min(MAX_BLOCKS_PER_CHUNK, triton.next_power_of_2(triton.cdiv(blocks, 64))))
    return per_chunk, triton.cdiv(blocks, per_chunk)


class _TritonSegmentPDMA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, decay, write_w, read_w, v, h0, perm, start, sidx, final_rows, empty_z, eps):
        rows, seq_len, topk = decay.shape
        d_v = v.shape[-1]
        events = perm.shape[1]
        per_chunk, chunks = _layout(events)
        dv_pad = triton.next_power_of_2(d_v)
        dev = v.device
        agg = torch.empty(rows, chunks, d_v + 2, dtype=torch.float32, device=dev)
        chunk_carry = torch.empty(rows, chunks, d_v + 1, dtype=torch.float32, device=dev)
        block_carry = torch.empty(rows, chunks * per_chunk, d_v + 1, dtype=torch.float32, device=dev)
        # Every read event writes its own row (the sort is a permutation of all events): no memset.
        out = torch.empty(rows * seq_len * topk, d_v, dtype=torch.float32, device=dev)
        final = None
        if final_rows:
            final = h0.clone() if h0 is not None else empty_rows(final_rows, d_v, empty_z, dev)
        h0_arg = h0 if h0 is not None else agg  # never read without HAS_H0
        sidx_arg = sidx if sidx is not None else perm
        common = dict(K=topk, DV=dv_pad, BLOCK=BLOCK, BLOCKS=per_chunk, HAS_H0=h0 is not None, num_warps=NUM_WARPS)
        kernels.fwd_aggregate_kernel[(rows, chunks)](
            perm, start, decay, write_w, v, h0_arg, sidx_arg, agg, events, seq_len, d_v, chunks, empty_z, **common)
        kernels.carry_kernel[(rows,)](agg, chunk_carry, chunks, d_v, DV=dv_pad, REVERSE=False)
        kernels.fwd_output_kernel[(rows, chunks)](
            perm, start, decay, write_w, read_w, v, h0_arg, sidx_arg, chunk_carry, block_carry, out,
            final if final is not None else out, events, seq_len, d_v, chunks, empty_z, eps,
            STORE_FINAL=final is not None, **common)
        o = out.view(rows, seq_len, topk, d_v).sum(2)
        ctx.save_for_backward(decay, write_w, read_w, v, h0, perm, start, sidx, block_carry)
        ctx.layout = (per_chunk, chunks, empty_z, eps, BLOCK)
        return o, final

    @staticmethod
    def backward(ctx, grad_o, grad_final):
        decay, write_w, read_w, v, h0, perm, start, sidx, block_carry = ctx.saved_tensors
        per_chunk, chunks, empty_z, eps, block = ctx.layout
        rows, seq_len, topk = decay.shape
        d_v = v.shape[-1]
        events = perm.shape[1]
        dv_pad = triton.next_power_of_2(d_v)
        dev = v.device
        grad_o = grad_o.contiguous().float()
        has_grad_final = grad_final is not None
        if has_grad_final:
            grad_final = grad_final.contiguous().float()
        agg = torch.empty(rows, chunks, d_v + 2, dtype=torch.float32, device=dev)
        grad_carry = torch.empty(rows, chunks, d_v + 1, dtype=torch.float32, device=dev)
        # Each event writes its own entries, as in the forward.
        grad_decay = torch.empty_like(decay)
        grad_write_w = torch.empty_like(write_w)
        grad_read_w = torch.empty_like(read_w)
        grad_v_events = torch.empty(rows * seq_len * topk, d_v, dtype=torch.float32, device=dev)
        grad_h0 = None
        if h0 is not None:
            grad_h0 = grad_final.clone() if has_grad_final else torch.zeros_like(h0)
        h0_arg = h0 if h0 is not None else agg
        sidx_arg = sidx if sidx is not None else perm
        grad_final_arg = grad_final if has_grad_final else agg
        common = dict(K=topk, DV=dv_pad, BLOCK=block, BLOCKS=per_chunk, HAS_H0=h0 is not None,
                      HAS_GRAD_FINAL=has_grad_final, num_warps=NUM_WARPS)
        kernels.bwd_aggregate_kernel[(rows, chunks)](
            perm, start, decay, write_w, read_w, v, h0_arg, sidx_arg, block_carry, grad_o, grad_final_arg, agg,
            events, seq_len, d_v, chunks, empty_z, eps, **common)
        kernels.carry_kernel[(rows,)](agg, grad_carry, chunks, d_v, DV=dv_pad, REVERSE=True)
        kernels.bwd_output_kernel[(rows, chunks)](
            perm, start, decay, write_w, read_w, v, h0_arg, sidx_arg, block_carry, grad_carry, grad_o,
            grad_final_arg, grad_decay, grad_write_w, grad_read_w, grad_v_events,
            grad_h0 if grad_h0 is not None else agg, events, seq_len, d_v, chunks, empty_z, eps, **common)
        grad_v = grad_v_events.view(rows, seq_len, topk, d_v).sum(2)
        return grad_decay, grad_write_w, grad_read_w, grad_v, grad_h0, None, None, None, None, None, None


def empty_rows(n: int, d_v: int, empty_z: float, device) -> torch.Tensor:
    """``n`` rows [S, z] of the empty state: S = 0, z = ``empty_z`` (fp32)."""
    rows = torch.zeros(n, d_v + 1, dtype=torch.float32, device=device)
    rows[:, d_v] = empty_z
    return rows


def segment_pdma_triton(decay, write_w, read_w, v, *, perm, start, eps, empty_z, h0=None, sidx=None,
                        final_rows: int = 0):
    """PDMA over the slot-sorted event stream of each row, reads fused; fp32 throughout.

    Per token (``[R, T, K]``, token order): ``decay`` = (1 - w)^gamma and ``write_w`` of the K
    writes, ``read_w`` of the K reads; ``v [R, T, d_v]``. Per row, the ``E = 2 T K`` events sorted
    by (sequence, slot), writes of a step before its reads: ``perm [R, E]`` (int32, the event's
    position ``t * 2K + lane`` in token order, lanes < K writes) and ``start [R, E]`` (int8, first
    event of a slot's segment). ``h0 [S, d_v + 1]``: initial [S, z] rows and ``sidx [R, E]`` the
    row of each event's slot (None: the empty state S = 0, z = ``empty_z``). ``final_rows`` > 0
    returns the final state rows as well (``sidx`` needed).

    Returns ``o [R, T, d_v]`` (= sum_k r_k S_k / (z_k + eps)) and the final rows or None; both
    differentiable w.r.t. the float inputs.
    """
    return _TritonSegmentPDMA.apply(decay, write_w, read_w, v, h0, perm, start, sidx, final_rows, empty_z, eps)
