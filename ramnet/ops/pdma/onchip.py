"""Token-by-token PDMA with the forward on the on-chip CUDA kernel (``onchip_kernels.py``: each
block's slice of the state tables in shared memory) and the backward of the Triton token kernels
(``token_triton.py``), unchanged: ``_OnchipPDMA`` subclasses ``_TokenPDMA`` and overrides only the
forward, which leaves what that backward reads exactly as the Triton forward does (the final tables
``S [N*H*M, d_v]`` and ``z`` with one copy per slice of the Triton launch shape, the pre-write rows
``saved_S``, ``saved_z`` at their events). Same arguments and results as ``token_pdma_triton``.

CUDA only (no interpreter runs CUDA C): on another device ``onchip_pdma`` raises. It needs
``torch.cuda._compile_kernel`` (NVRTC; torch >= 2.8) and ``M * (DS + 1) * 4`` bytes of shared
memory a block (``onchip_fits``). Not the op's default: ``pdma_kernels("onchip")`` forces it.
"""

from __future__ import annotations

import math

import torch

from ..autograd_support import without_autocast
from . import onchip_kernels as kernels
from .token_triton import KERNEL_MAX_TOPK, _TokenPDMA, finish_forward, forward_buffers, token_config

# Columns of d_v a block (one thread each, one warp): 32, or 16 (also taken where d_v <= 16).
WIDTH = 32
# Tokens whose inputs are loaded ahead of the one running (registers: PF token buffers).
PREFETCH = 2
# Sizes reach the kernel as 32-bit ints; t + PREFETCH must not overflow either.
INT_LIMIT = 2**31 - 64


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


def require_onchip(device, memory_slots: int, d_v: int) -> None:
    """Raise a clear error where the on-chip kernel cannot run."""
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip is not None:
        raise RuntimeError(f"the on-chip PDMA kernel (pdma_kernels('onchip')) is CUDA C and needs CUDA tensors on an "
                           f"NVIDIA GPU, got device {device}; use pdma_kernels('token') or 'sorted' instead")
    if not onchip_fits(memory_slots, d_v, device):
        width = onchip_shape(d_v)[0]
        raise ValueError(f"the on-chip PDMA kernel holds M * (DS + 1) * 4 = {shared_bytes(memory_slots, width)} bytes "
                         f"of shared memory a block (M={memory_slots}, DS={width}); {device} allows "
                         f"{shared_memory_limit(device)}")


_shared_configured: dict[int, int] = {}


def _launch(token_args, S, z, saved_S, saved_z, o, memory_slots: int, eps: float, width: int, slices: int,
            rows: int, save: bool, has_h0: bool, varlen: bool):
    write_idx, write_w, decay, read_idx, read_w, v, cu = token_args
    seq_len, heads, topk = write_idx.shape[1:]
    d_v = v.shape[-1]
    for name, size in (("T", seq_len), ("H", heads), ("M", memory_slots), ("d_v", d_v), ("N*H", rows)):
        if size > INT_LIMIT:
            raise ValueError(f"the on-chip PDMA kernel takes sizes below 2**31, got {name}={size}")
    kernel = kernels.compiled(v.device, topk, width, varlen, save, write_idx.dtype, v.dtype, has_h0, PREFETCH)
    nbytes = shared_bytes(memory_slots, width)
    cu32 = cu.to(device=v.device, dtype=torch.int32) if varlen else write_idx  # never read without VARLEN
    with torch.cuda.device(v.device):
        if _shared_configured.get(id(kernel), -1) < nbytes:
            if not hasattr(kernel, "set_shared_memory_config"):
                raise RuntimeError(f"the on-chip PDMA kernel needs {nbytes} bytes of shared memory a block, which "
                                   f"torch {torch.__version__}'s compiled kernels cannot be given (no "
                                   f"set_shared_memory_config)")
            kernel.set_shared_memory_config(nbytes)
            _shared_configured[id(kernel)] = nbytes
        kernel(grid=(rows, slices, 1), block=(width, 1, 1), shared_mem=nbytes,
               args=[write_idx, write_w, decay, read_idx, read_w, v, cu32, S, z, saved_S, saved_z, o,
                     seq_len, heads, memory_slots, d_v, float(eps)])


class _OnchipPDMA(_TokenPDMA):
    """``_TokenPDMA`` with the forward on the on-chip CUDA kernel; ``backward`` is inherited."""

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


def onchip_pdma(write_idx, write_w, decay, read_idx, read_w, v, *, memory_slots: int, eps: float,
                initial_state=None, output_final_state: bool = False, cu_seqlens=None):
    """``token_pdma_triton`` with the forward on the on-chip CUDA kernel (the backward is the
    Triton token backward): CUDA only, K <= ``KERNEL_MAX_TOPK``, ``onchip_fits(M, d_v, device)``.
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
