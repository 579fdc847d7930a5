"""Token-by-token PDMA on the on-chip CUDA kernels (``onchip_kernels.py``: each block's slice of the
state tables in shared memory), forward and backward. ``_OnchipPDMA`` subclasses ``_TokenPDMA``
(``token_triton.py``): its forward leaves exactly what the Triton token backward reads (the final
tables ``S [N*H*M, d_v]`` and ``z`` with one copy per slice of the Triton launch shape, the pre-write
rows ``saved_S``, ``saved_z`` at their events), and its backward runs the on-chip backward kernel on
them where a block's tables fit in shared memory, else the inherited Triton token backward
(``BACKWARD`` forces one). Same arguments and results as ``token_pdma_triton``.

CUDA only (no interpreter runs CUDA C): on another device ``onchip_pdma`` raises. It needs
``torch.cuda._compile_kernel`` (NVRTC; torch >= 2.8) and ``M * (DS + 1) * 4`` bytes of shared
memory a block for the forward (``onchip_fits``); the backward holds the state and its adjoint,
``2 * M * (DS + 1) * 4`` bytes at its own width (``onchip_backward_fits``). Not the op's default:
``pdma_kernels("onchip")`` forces it.
"""

from __future__ import annotations

import math

import torch

from .. import nvrtc
from ..autograd_support import first_order_backward, without_autocast
from . import onchip_kernels as kernels
from .token_triton import (KERNEL_MAX_TOPK, _TokenPDMA, backward_results, finish_forward, forward_buffers,
                           token_config)

# Columns of d_v a block (one thread each, one warp): 32, or 16 (also taken where d_v <= 16).
WIDTH = 32
# Tokens whose inputs are loaded ahead of the one running (registers: PF token buffers).
PREFETCH = 2
# Sizes reach the kernel as 32-bit ints; t + PREFETCH must not overflow either.
INT_LIMIT = 2**31 - 64
# Which backward ``_OnchipPDMA`` runs: "auto" the on-chip one on CUDA where its tables fit in shared memory
# (``onchip_backward_fits``), else the Triton token backward; "onchip" always the on-chip one (it raises where
# it cannot run); "triton" always the Triton one. For tests and benchmarks.
BACKWARD = "auto"
BACKWARDS = ("auto", "onchip", "triton")
# Columns of d_v a backward block: 16 (8 where d_v <= 8), or 8 or 32. Its shared memory holds the state and
# its adjoint, twice the forward's at a width: 16 columns keep M 1024 in (139,264 bytes).
BACKWARD_WIDTH = 16
# Tokens whose inputs (with the saved rows and the output's gradient) the backward loads ahead: at K 8, 2
# keeps ptxas within the 255 registers a thread without spills, 3 spills.
BACKWARD_PREFETCH = 2


def onchip_shape(d_v: int) -> tuple[int, int]:
    """``(columns a block, slices)``."""
    width = 16 if WIDTH == 16 or d_v <= 16 else 32
    return width, math.ceil(d_v / width)


def shared_bytes(memory_slots: int, width: int) -> int:
    """Dynamic shared memory of one block: its slice of S (``M x width``) and its z (``M``), fp32."""
    return memory_slots * (width + 1) * 4


def shared_memory_limit(device) -> int:
    """The most dynamic shared memory a block of ``device`` may opt in to (0 off CUDA)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 48 * 1024))


def onchip_fits(memory_slots: int, d_v: int, device) -> bool:
    """Whether a block's slice of the tables, ``M * (DS + 1) * 4`` bytes, fits in ``device``'s
    shared memory (135,168 bytes at M 1024, d_v 64; an H100 or H200 opts in to 232,448)."""
    return shared_bytes(memory_slots, onchip_shape(d_v)[0]) <= shared_memory_limit(device)


def backward_shape(d_v: int) -> tuple[int, int]:
    """``(columns a backward block, slices)``: ``BACKWARD_WIDTH`` columns, fewer (8 or 16) where d_v
    is narrower."""
    if BACKWARD_WIDTH not in (8, 16, 32):
        raise ValueError(f"onchip.BACKWARD_WIDTH must be 8, 16 or 32, got {BACKWARD_WIDTH}")
    width = min(BACKWARD_WIDTH, max(8, 1 << (d_v - 1).bit_length()))
    return width, math.ceil(d_v / width)


def backward_shared_bytes(memory_slots: int, width: int) -> int:
    """Dynamic shared memory of one backward block: its slice of S and of S's adjoint (``M x width``
    each) and its z and z's adjoint share (``M`` each), fp32."""
    return 2 * shared_bytes(memory_slots, width)


def onchip_backward_fits(memory_slots: int, d_v: int, device) -> bool:
    """Whether a backward block's tables, ``2 * M * (DS + 1) * 4`` bytes, fit in ``device``'s shared
    memory (139,264 bytes at M 1024 and 16 columns; an H100 or H200 opts in to 232,448: up to M 1709
    at 16 columns, 3228 at 8 and 880 at 32)."""
    return backward_shared_bytes(memory_slots, backward_shape(d_v)[0]) <= shared_memory_limit(device)


def _require(what: str, device, nbytes: int, rule: str, memory_slots: int, width: int) -> None:
    """Raise a clear error where ``what`` (CUDA C, ``nbytes`` of shared memory a block by ``rule``) cannot run."""
    if not nvrtc.on_nvidia(device):
        raise RuntimeError(f"{what} is CUDA C and needs CUDA tensors on an NVIDIA GPU, got device {device}; use "
                           f"pdma_kernels('token') or 'sorted' instead")
    if nbytes > shared_memory_limit(device):
        raise ValueError(f"{what} holds {rule} = {nbytes} bytes of shared memory a block (M={memory_slots}, "
                         f"DS={width}); {device} allows {shared_memory_limit(device)}")


def require_onchip(device, memory_slots: int, d_v: int) -> None:
    """Raise a clear error where the on-chip kernel cannot run."""
    width = onchip_shape(d_v)[0]
    _require("the on-chip PDMA kernel (pdma_kernels('onchip'))", device, shared_bytes(memory_slots, width),
             "M * (DS + 1) * 4", memory_slots, width)


def require_onchip_backward(device, memory_slots: int, d_v: int) -> None:
    """Raise a clear error where the on-chip backward cannot run (``BACKWARD = "onchip"``)."""
    width = backward_shape(d_v)[0]
    _require("the on-chip PDMA backward (onchip.BACKWARD = 'onchip')", device,
             backward_shared_bytes(memory_slots, width), "2 * M * (DS + 1) * 4", memory_slots, width)


def backward_on_chip(device, memory_slots: int, d_v: int) -> bool:
    """Whether ``_OnchipPDMA.backward`` runs the on-chip backward (``BACKWARD``)."""
    if BACKWARD not in BACKWARDS:
        raise ValueError(f"onchip.BACKWARD must be one of {BACKWARDS}, got {BACKWARD!r}")
    if BACKWARD == "triton":
        return False
    if BACKWARD == "onchip":
        require_onchip_backward(device, memory_slots, d_v)
        return True
    return nvrtc.on_nvidia(device) and onchip_backward_fits(memory_slots, d_v, device)


def _check_sizes(seq_len: int, heads: int, memory_slots: int, d_v: int, rows: int) -> None:
    for name, size in (("T", seq_len), ("H", heads), ("M", memory_slots), ("d_v", d_v), ("N*H", rows)):
        if size > INT_LIMIT:
            raise ValueError(f"the on-chip PDMA kernel takes sizes below 2**31, got {name}={size}")


_shared_configured: dict[int, int] = {}


def _configure_shared(kernel, nbytes: int) -> None:
    """Let ``kernel`` launch with ``nbytes`` of dynamic shared memory (once per kernel and size)."""
    if _shared_configured.get(id(kernel), -1) < nbytes:
        if not hasattr(kernel, "set_shared_memory_config"):
            raise RuntimeError(f"the on-chip PDMA kernel needs {nbytes} bytes of shared memory a block, which "
                               f"torch {torch.__version__}'s compiled kernels cannot be given (no "
                               f"set_shared_memory_config)")
        kernel.set_shared_memory_config(nbytes)
        _shared_configured[id(kernel)] = nbytes


def _launch(token_args, S, z, saved_S, saved_z, o, memory_slots: int, eps: float, width: int, slices: int,
            rows: int, save: bool, has_h0: bool, varlen: bool):
    write_idx, write_w, decay, read_idx, read_w, v, cu = token_args
    seq_len, heads, topk = write_idx.shape[1:]
    d_v = v.shape[-1]
    _check_sizes(seq_len, heads, memory_slots, d_v, rows)
    kernel = kernels.compiled(v.device, topk, width, varlen, save, write_idx.dtype, v.dtype, has_h0, PREFETCH)
    nbytes = shared_bytes(memory_slots, width)
    cu32 = cu.to(device=v.device, dtype=torch.int32) if varlen else write_idx  # never read without VARLEN
    with torch.cuda.device(v.device):
        _configure_shared(kernel, nbytes)
        kernel(grid=(rows, slices, 1), block=(width, 1, 1), shared_mem=nbytes,
               args=[write_idx, write_w, decay, read_idx, read_w, v, cu32, S, z, saved_S, saved_z, o,
                     seq_len, heads, memory_slots, d_v, float(eps)])


def _backward(ctx, grad_o, grad_S, grad_z):
    """``_TokenPDMA.backward`` on the on-chip backward kernel: the same inputs and results. The kernel
    loads the final tables ``S``, ``z`` (slice 0's copy; every copy is the same) into shared memory
    and rolls them back there, never writing them: the backward can run again. The adjoint tables
    start from the final state's gradients (z's in slice 0's share: the slices' shares add up) and
    end as the initial state's, one z share per slice of this kernel's width, summed here as the
    per-slice shares of the write weight, decay and read weight gradients are."""
    write_idx, write_w, decay, read_idx, read_w, v, cu, S, z, saved_S, saved_z = ctx.saved_tensors
    config, has_h0, _, eps, num_seqs, memory_slots = ctx.setup
    seq_len, heads, topk = write_idx.shape[1:]
    d_v, dev = v.shape[-1], v.device
    table_rows = z.shape[1]
    width, slices = backward_shape(d_v)
    events = write_idx.numel()
    rows = num_seqs * heads
    grad_final = grad_S is not None or grad_z is not None
    dS = dz = saved_z  # never read nor written unless the state has a gradient in or out
    if grad_final or has_h0:
        dS = torch.zeros(table_rows, d_v, dtype=torch.float32, device=dev)
        if grad_S is not None:
            dS.copy_(grad_S.reshape(table_rows, d_v))
        dz = torch.zeros(slices, table_rows, dtype=torch.float32, device=dev)
        if grad_z is not None:  # one slice carries it; the slices' z adjoints add up
            dz[0] = grad_z.reshape(table_rows)
    grads = torch.empty(3, slices, events, dtype=torch.float32, device=dev)
    grad_v = torch.empty(v.shape, dtype=torch.float32, device=dev)
    if table_rows:
        varlen = bool(config["VARLEN"])
        _check_sizes(seq_len, heads, memory_slots, d_v, rows)
        kernel = kernels.compiled_backward(dev, topk, width, varlen, write_idx.dtype, v.dtype, grad_final, has_h0,
                                           BACKWARD_PREFETCH)
        nbytes = backward_shared_bytes(memory_slots, width)
        cu32 = cu.to(device=dev, dtype=torch.int32) if varlen else write_idx  # never read without VARLEN
        with torch.cuda.device(dev):
            _configure_shared(kernel, nbytes)
            kernel(grid=(rows, slices, 1), block=(width, 1, 1), shared_mem=nbytes,
                   args=[write_idx, write_w, decay, read_idx, read_w, v, cu32, S, z[0], saved_S, saved_z, dS, dz,
                         grad_o.float().contiguous(), grads[0], grads[1], grads[2], grad_v,
                         seq_len, heads, memory_slots, d_v, float(eps)])
    return backward_results(ctx, grads, grad_v, dS, dz)


class _OnchipPDMA(_TokenPDMA):
    """``_TokenPDMA`` with the forward on the on-chip CUDA kernel, and the backward on the on-chip
    backward kernel or the inherited Triton one (``backward_on_chip``)."""

    @staticmethod
    @without_autocast
    def forward(ctx, write_w, decay, read_w, v, S0, z0, write_idx, read_idx, cu_seqlens, memory_slots, eps,
                return_final):
        d_v = v.shape[-1]
        num_seqs = write_idx.shape[0] if cu_seqlens is None else len(cu_seqlens) - 1
        rows = num_seqs * write_idx.shape[2]
        width, slices = onchip_shape(d_v)
        # The backward's launch constants and slices, as the Triton forward would have set them.
        config, token_slices = token_config(write_idx.shape[-1], d_v, cu_seqlens is not None)
        save = any(ctx.needs_input_grad[:6])
        S, z, saved_S, saved_z, o = forward_buffers(write_idx, v, S0, z0, memory_slots, num_seqs, slices, save)
        cu = cu_seqlens if cu_seqlens is not None else write_idx  # never read without VARLEN
        token_args = (write_idx, write_w, decay, read_idx, read_w, v, cu)
        if rows:
            _launch(token_args, S, z, saved_S, saved_z, o, memory_slots, eps, width, slices, rows, save,
                    has_h0=S0 is not None, varlen=cu_seqlens is not None)
        if slices != token_slices:  # every slice's z copy is the same; the backward wants one per slice of its own
            z = z[:1].repeat(token_slices, 1)
        return finish_forward(ctx, token_args, S, z, saved_S, saved_z, o, config, S0, eps, num_seqs, memory_slots,
                              return_final)

    @staticmethod
    @first_order_backward
    def backward(ctx, grad_o, grad_S, grad_z):
        v = ctx.saved_tensors[5]
        if backward_on_chip(v.device, ctx.setup[5], v.shape[-1]):
            return _backward(ctx, grad_o, grad_S, grad_z)
        return _TokenPDMA.backward(ctx, grad_o, grad_S, grad_z)


def onchip_pdma(write_idx, write_w, decay, read_idx, read_w, v, *, memory_slots: int, eps: float,
                initial_state=None, output_final_state: bool = False, cu_seqlens=None):
    """``token_pdma_triton`` on the on-chip CUDA kernels (the backward on chip where it fits, else the
    Triton token backward: ``BACKWARD``): CUDA only, K <= ``KERNEL_MAX_TOPK``, ``onchip_fits(M, d_v,
    device)``.
    Returns ``o [B, T, H, d_v]`` fp32 and ``(S, z)`` fp32 or None."""
    topk = write_idx.shape[-1]
    if topk > KERNEL_MAX_TOPK or memory_slots >= 2**31:
        raise ValueError(f"the token PDMA kernels take K <= {KERNEL_MAX_TOPK} and M < 2**31, got K={topk}, "
                         f"M={memory_slots}")
    require_onchip(v.device, memory_slots, v.shape[-1])
    # The kernel reads fp32 weights and int32 or int64 slots (the decoder's are fp32 and int64).
    write_w, decay, read_w = (x.float() for x in (write_w, decay, read_w))
    if write_idx.dtype not in kernels.INDEX_TYPES:
        write_idx = write_idx.long()
    read_idx = read_idx.to(write_idx.dtype)
    S0, z0 = initial_state if initial_state is not None else (None, None)
    o, S, z = _OnchipPDMA.apply(write_w.contiguous(), decay.contiguous(), read_w.contiguous(), v.contiguous(),
                                S0, z0, write_idx.contiguous(), read_idx.contiguous(), cu_seqlens, memory_slots,
                                float(eps), bool(output_final_state))
    return o, ((S, z) if output_final_state else None)
