"""The fused Triton address decoder (jit code in ``triton_kernels.py``): its launch shape, its
compile-time constants and the autograd Function of ``triton_beam_topk``. Its forward runs the CUDA C
forward (``cuda.py``) instead where that fits (``cuda.DECODER``); the backward is always Triton's."""

from __future__ import annotations

import torch
import triton

from ..autograd_support import first_order_backward, without_autocast
from ..triton_support import require_triton
from . import cuda as cuda_decoder
from . import triton_kernels as kernels


# Launch shape: rows per program and warps. benchmarks/tune_kernels.py on an H200 (paper shape, fwd+bwd
# over 524,288 rows): 32 rows / 1 warp 0.44 ms; 16 rows 0.61, 64 rows 0.67 (0.45 at 2 warps), 8 rows
# 0.97; 4 warps 0.78-2.3 ms. But at 32 rows the backward under Triton 3.6 gave wrong gradients for
# 10 of 37 rows with a CAPE shift (U 4, d_p 6, K 1; right at 16 rows and in the interpreter): the
# leading digit was off as if the int64 `% M` undoing the shift had been skipped. The shift is now
# reduced on the host and undone with a compare; with that, all 53 GPU tests pass at 32 rows (H100,
# Triton 3.6), and tune_kernels.py checks each shape's results before timing it.
ROWS_PER_PROGRAM = 32  # at most; fewer when a tile would pass about 8K fp32 (large d_p or K)
NUM_WARPS = 1
MAX_UNROLLED_PARTITIONS = 8  # beyond, the kernels loop over partitions (U = 62 unrolled: minutes of compile)


def decoder_constants(d_k: int, num_partitions: int, topk: int, has_shift: bool) -> dict:
    """The compile-time constants of the decoder kernels for one geometry, and their warps: all that
    ``beam_topk_bwd_kernel`` takes (the forward also takes ``beam_search_constants``)."""
    d_p = d_k // num_partitions
    memory_slots = d_p**num_partitions  # exact Python int: M may be 2**62
    dp_pad = triton.next_power_of_2(d_p)
    kb = max(2, triton.next_power_of_2(topk))  # >= 2: no size-1 tiles
    # About 8K fp32 per tile (the d_p row or the K*K candidates), so U=1 with d_p=4096 still fits.
    block_n = max(2, min(64, 8192 // max(dp_pad, kb * kb)))
    if ROWS_PER_PROGRAM is not None:
        block_n = min(block_n, ROWS_PER_PROGRAM)
    return dict(U=num_partitions, DP=d_p, DP_PAD=dp_pad, KB=kb, K_OUT=min(topk, memory_slots),
                M=memory_slots, HAS_SHIFT=has_shift, INDEX_64=memory_slots >= 2**31,
                UNROLL=num_partitions <= MAX_UNROLLED_PARTITIONS, BLOCK_N=block_n,
                num_warps=NUM_WARPS)


def beam_search_constants(constants: dict, topk: int) -> dict:
    """``decoder_constants`` plus those of the beam search (``beam_topk_rows``, the forward): K, and
    the picks per partition (KP, padded KPB)."""
    picks = min(topk, constants["DP"])
    return dict(constants, K=topk, KP=picks, KPB=max(2, triton.next_power_of_2(picks)))


class _BeamTopK(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, x, shift, num_partitions, topk, tau):
        constants = decoder_constants(x.shape[1], num_partitions, topk, shift is not None)
        n = x.shape[0]
        index = torch.empty(n, constants["K_OUT"], dtype=torch.int64, device=x.device)
        weight = torch.empty(n, constants["K_OUT"], dtype=torch.float32, device=x.device)
        if shift is not None:  # to [0, M) (floor remainder) once, so the kernels undo it with a compare
            shift = torch.remainder(shift, constants["M"]).contiguous()
        if cuda_decoder.use_cuda_decoder(x, num_partitions, topk):  # the CUDA C forward (address/cuda.py)
            cuda_decoder.cuda_beam_topk_fwd(x, shift, index, weight, num_partitions, topk, tau)
        else:
            shift_arg = index if shift is None else shift  # any int64 pointer; unread without HAS_SHIFT
            grid = (triton.cdiv(n, constants["BLOCK_N"]),)
            kernels.beam_topk_fwd_kernel[grid](x, shift_arg, index, weight, n, x.stride(0), tau,
                                               **beam_search_constants(constants, topk))
        ctx.mark_non_differentiable(index)
        ctx.save_for_backward(x, shift, index, weight)
        ctx.constants, ctx.tau = constants, tau
        return index, weight

    @staticmethod
    @first_order_backward
    def backward(ctx, grad_index, grad_weight):
        x, shift, index, weight = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        grid = (triton.cdiv(x.shape[0], ctx.constants["BLOCK_N"]),)
        kernels.beam_topk_bwd_kernel[grid](x, index if shift is None else shift, index, weight,
                                           grad_weight.float().contiguous(), grad_x, x.shape[0], x.stride(0), ctx.tau,
                                           **ctx.constants)
        return grad_x, None, None, None, None


def triton_beam_topk(x: torch.Tensor, num_partitions: int, topk: int, tau: float, shift=None):
    """Exact top-K address of each row of ``x [N, d_k]`` (fp32, bf16 or fp16; computed in fp32).

    Returns ``(index int64 [N, K], weight fp32 [N, K])`` equal to ``beam_topk(x.float(), U, K, tau)``
    followed by the CAPE shift ``index = (index - shift) mod M`` when ``shift`` (int64 ``[N]``) is
    given. ``weight`` is differentiable w.r.t. ``x`` (grad in ``x``'s dtype). Callers validate.
    """
    require_triton(x.device, "triton_beam_topk")
    if shift is not None:
        shift = shift.to(torch.int64)
    return _BeamTopK.apply(x.contiguous(), shift, int(num_partitions), int(topk), float(tau))
