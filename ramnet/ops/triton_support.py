"""Where the Triton kernels can run: on CUDA tensors, or on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1``, set before triton is imported), which is how the CPU test
suite checks the kernels against the torch paths."""

from __future__ import annotations

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device) -> bool:
    """True when Triton kernels can run on tensors of ``device``."""
    if not HAS_TRITON:
        return False
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and interpreting())


def kernels_apply(x: torch.Tensor) -> bool:
    """Whether the default paths run ``x`` on the Triton kernels: CUDA tensors with Triton
    installed, except fp64 (the kernels compute in fp32; fp64 stays on the fp64 torch paths)."""
    return HAS_TRITON and x.device.type == "cuda" and x.dtype != torch.float64


def require_triton(device, what: str) -> None:
    """Raise a clear error when ``what`` (a Triton path) cannot run on ``device``."""
    if not HAS_TRITON:
        raise ImportError(f"{what} needs Triton: pip install 'ramnet[triton]'")
    if not triton_runs_on(device):
        raise ValueError(f"{what} runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got device {device}")
