"""The address decoder's forward in CUDA C (source in ``cuda_kernels.py``): which forward
``_BeamTopK`` (``triton.py``) runs, and the launch of the CUDA C one. Its results are the Triton
forward's (the same slots in the same order, the weights to a few 1e-6 relative), in the same form,
so the Triton backward runs on them.

``DECODER`` decides: "triton" (the default) always the Triton forward; "auto" the CUDA C forward on
NVIDIA CUDA tensors inside its domain (``cuda_decoder_fits``) outside torch.compile and CUDA graph
captures, the Triton one elsewhere; "cuda" always the CUDA C one (raising where it cannot run, never
falling back). The default stays "triton" until the CUDA C forward has run on a GPU (its source is
checked on the CPU only: under g++ against ``beam_topk`` and the interpreted Triton kernel, and by nvcc
for sm_90; the session that wrote it had no GPU time left), then "auto" is meant to be the default.
"""

from __future__ import annotations

import torch

from .. import nvrtc
from . import cuda_kernels as kernels
from .beam import traced

DECODER = "triton"  # "auto" once measured on a GPU (module docstring)
DECODERS = ("auto", "cuda", "triton")
# Rows and the row stride reach the kernel as 32-bit ints.
INT_LIMIT = 2**31 - 1


def cuda_decoder_fits(d_k: int, num_partitions: int, topk: int, device) -> bool:
    """Whether the CUDA C forward can decode rows of ``d_k`` logits on ``device``: an NVIDIA CUDA
    device, a torch with NVRTC (``torch.cuda._compile_kernel``), and the kernel's domain (U <= 16,
    d_p <= 32, K <= 16, K * K * min(K, d_p) <= 1024, M < 2**31: ``cuda_kernels.in_domain``)."""
    return nvrtc.on_nvidia(device) and nvrtc.can_compile() and kernels.in_domain(d_k, num_partitions, topk)


def use_cuda_decoder(x: torch.Tensor, num_partitions: int, topk: int) -> bool:
    """Whether ``_BeamTopK.forward`` runs the CUDA C forward on ``x [N, d_k]`` (``DECODER``)."""
    if DECODER not in DECODERS:
        raise ValueError(f"address.cuda.DECODER must be one of {DECODERS}, got {DECODER!r}")
    if DECODER == "triton":
        return False
    fits = (cuda_decoder_fits(x.shape[1], num_partitions, topk, x.device) and x.dtype in kernels.X_KINDS
            and x.shape[0] <= INT_LIMIT and x.stride(0) <= INT_LIMIT)
    if DECODER == "cuda":
        if not fits:
            require_cuda_decoder(x, num_partitions, topk)
        return True
    return fits and not traced(x)


def require_cuda_decoder(x: torch.Tensor, num_partitions: int, topk: int) -> None:
    """Raise a clear error where the CUDA C forward cannot decode ``x``."""
    what = "the CUDA C address decoder (address.cuda.DECODER = 'cuda')"
    if not nvrtc.on_nvidia(x.device):
        raise RuntimeError(f"{what} needs CUDA tensors on an NVIDIA GPU, got device {x.device}; use DECODER "
                           f"'auto' or 'triton'")
    if not nvrtc.can_compile():
        raise RuntimeError(f"{what} is compiled by torch.cuda._compile_kernel (NVRTC, torch >= 2.8); torch "
                           f"{torch.__version__} has none")
    if not kernels.in_domain(x.shape[1], num_partitions, topk):
        kernels.source(x.shape[1], num_partitions, topk, torch.float32, False)  # raises, naming the domain
    if x.dtype not in kernels.X_KINDS:
        raise ValueError(f"{what} takes fp32, bf16, fp16 or fp64 x, got {x.dtype}")
    if x.shape[0] > INT_LIMIT or x.stride(0) > INT_LIMIT:
        raise ValueError(f"{what} takes fewer than 2**31 rows and a row stride below 2**31, got {x.shape[0]} "
                         f"rows of stride {x.stride(0)}")


def compiled(device, d_k: int, num_partitions: int, topk: int, x_type: torch.dtype, has_shift: bool):
    """The forward for one configuration on ``device`` (a CUDA device), compiled once per process."""
    key = ("beam_topk_fwd", d_k, num_partitions, topk, x_type, bool(has_shift))
    return nvrtc.compiled(device, key, lambda: (kernels.source(d_k, num_partitions, topk, x_type, has_shift),
                                                kernels.KERNEL_NAME))


def cuda_beam_topk_fwd(x: torch.Tensor, shift, index: torch.Tensor, weight: torch.Tensor, num_partitions: int,
                       topk: int, tau: float) -> None:
    """Fill ``index [N, K_OUT]`` (int64) and ``weight [N, K_OUT]`` (fp32) with the decoded rows of ``x
    [N, d_k]`` (rows of stride ``x.stride(0)``, entries contiguous), as ``beam_topk_fwd_kernel`` does;
    ``shift`` int64 ``[N]`` already in [0, M), or None."""
    n = x.shape[0]
    if n == 0:
        return
    kernel = compiled(x.device, x.shape[1], num_partitions, topk, x.dtype, shift is not None)
    shift_arg = index if shift is None else shift  # any int64 pointer; unread without HAS_SHIFT
    blocks = -(-n // kernels.BLOCK)
    with torch.cuda.device(x.device):
        kernel(grid=(blocks, 1, 1), block=(kernels.BLOCK, 1, 1),
               args=[x, shift_arg, index, weight, n, x.stride(0), float(tau)])
