"""CUDA C kernels compiled at run time with NVRTC, through ``torch.cuda._compile_kernel`` (a private
torch API, torch >= 2.8): one place for the compile and its per-process cache, used by the on-chip
PDMA kernels (``pdma/onchip_kernels.py``) and the CUDA C address decoder (``address/cuda.py``).

Their sources include no header (the halves are converted by hand), so NVRTC needs no include path.
"""

from __future__ import annotations

import os
from typing import Callable

import torch


def on_nvidia(device) -> bool:
    """Whether ``device`` is an NVIDIA CUDA device (not ROCm, whose torch also calls it "cuda")."""
    device = torch.device(device)
    return device.type == "cuda" and torch.version.hip is None


def can_compile() -> bool:
    """Whether this torch has ``torch.cuda._compile_kernel`` (NVRTC, torch >= 2.8)."""
    return getattr(torch.cuda, "_compile_kernel", None) is not None


def compile_kernel(text: str, name: str):
    """``torch.cuda._compile_kernel`` of kernel ``name`` in ``text`` on the current device. It puts
    ``CUDA_HOME/include`` on NVRTC's include path and raises where no CUDA toolkit is found (a pip
    torch with no toolkit): the sources include no header, so any directory serves then."""
    if not can_compile():
        raise RuntimeError(f"the CUDA C kernels (on-chip PDMA, address decoder) are compiled by "
                           f"torch.cuda._compile_kernel (NVRTC, torch >= 2.8); torch {torch.__version__} has none")
    from torch.utils import cpp_extension

    if getattr(cpp_extension, "CUDA_HOME", "") is not None:
        return torch.cuda._compile_kernel(text, name)
    cpp_extension.CUDA_HOME = os.path.dirname(torch.__file__)
    try:
        return torch.cuda._compile_kernel(text, name)
    finally:
        cpp_extension.CUDA_HOME = None


def device_index(device) -> int:
    """The CUDA device's index (the current device for a bare ``"cuda"``)."""
    device = torch.device(device)
    return device.index if device.index is not None else torch.cuda.current_device()


_compiled: dict[tuple, object] = {}


def compiled(device, key: tuple, build: Callable[[], tuple[str, str]]):
    """The kernel of ``key`` on ``device``, compiled once per process: ``build()`` gives its source
    text and kernel name, and runs only the first time (``key`` names every constant in the text)."""
    index = device_index(device)
    full_key = (index, *key)
    if full_key not in _compiled:
        with torch.cuda.device(index):
            _compiled[full_key] = compile_kernel(*build())
    return _compiled[full_key]
