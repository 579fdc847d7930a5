"""Argument validation shared by every public op (and by the layers and the config built on them).

Each check raises ``ValueError`` naming the argument and what is allowed, so that bad input
never turns into a silent broadcast or a wrong answer deeper down.
"""

from __future__ import annotations

import math
import os
from numbers import Integral, Real

import torch

# Slot indices are int64 and CAPE subtracts positions from them: keep M well inside that range.
MAX_MEMORY_SLOTS = 2**62
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops accumulate in, and keep states in, for inputs of ``dtype``: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_geometry(d_k: int, num_partitions) -> tuple[int, int]:
    """Return ``(d_p, M)`` for a key of ``d_k`` entries split into ``num_partitions`` parts."""
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, Integral) or num_partitions < 1:
        raise ValueError(f"num_partitions must be a positive int, got {num_partitions!r}")
    if d_k % num_partitions != 0:
        raise ValueError(
            f"the key/query dimension d_k={d_k} must be divisible by num_partitions={num_partitions}"
        )
    d_p = d_k // int(num_partitions)
    memory_slots = d_p ** int(num_partitions)
    if memory_slots > MAX_MEMORY_SLOTS:
        raise ValueError(
            f"num_partitions={num_partitions} with partition size d_p={d_p} gives M=d_p**U={memory_slots} "
            f"slots; at most 2**62 are allowed"
        )
    return d_p, memory_slots


def check_topk(topk, memory_slots: int) -> int:
    if isinstance(topk, bool) or not isinstance(topk, Integral) or not 1 <= topk <= memory_slots:
        raise ValueError(f"topk must be an int in [1, M={memory_slots}], got {topk!r}")
    return int(topk)


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_choice(name: str, value, allowed: tuple):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def check_positive(name: str, value, *, allow_zero: bool = False, upper: float | None = None) -> float:
    """A finite real scalar that is > 0 (or >= 0), and <= ``upper`` when given."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0) and (upper is None or value <= upper)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        if upper is not None:
            bound += f" and <= {upper}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def check_finite(name: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values; all entries must be finite")


def check_float_tensor(name: str, x, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must have a floating dtype (fp16, bf16, fp32, fp64), got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def check_same(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``x`` must share ``ref``'s dtype and device (nothing is cast or moved behind the caller's back)."""
    if x.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}; they must match")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; they must match")


def per_head(name: str, value, num_heads: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Turn a scalar or a ``[H]`` tensor/sequence into a ``[H]`` tensor, with no silent broadcast.

    ``dtype`` bool takes bools only (a bool, a sequence of bools or a bool tensor; 2 or "yes" are
    refused rather than read as True); other dtypes take real numbers (not bools, strings or None).
    A value of the wrong kind raises TypeError, a tensor of the wrong shape or dtype ValueError;
    both name the argument."""
    flag = dtype == torch.bool
    kinds = (f"a bool, one bool per head ({num_heads}) or a bool tensor [H]" if flag
             else f"a real number, one per head ({num_heads}) or a tensor [H]")
    if isinstance(value, torch.Tensor):
        if flag != (value.dtype == torch.bool) or value.is_complex():
            raise ValueError(f"{name} must be {kinds}, got a tensor of dtype {value.dtype}")
        if value.requires_grad:
            raise ValueError(f"{name} is a fixed hyper-parameter: pass a tensor that does not require grad")
        if value.dim() == 0:
            value = value.reshape(1).expand(num_heads)
        elif value.shape != (num_heads,):
            raise ValueError(f"{name} must be a scalar or have shape [H]=[{num_heads}], got {tuple(value.shape)}")
        return value.to(device=device, dtype=dtype)
    entries = list(value) if isinstance(value, (list, tuple)) else [value]
    if not all(_is_bool(x) if flag else (isinstance(x, Real) and not _is_bool(x)) for x in entries):
        raise TypeError(f"{name} must be {kinds}, got {value!r}")
    if isinstance(value, (list, tuple)):
        if len(value) != num_heads:
            each = "a bool or one bool" if flag else "a number or one"
            raise ValueError(f"{name} must be {each} per head ({num_heads}), got {len(value)} entries")
        return torch.tensor([bool(x) if flag else float(x) for x in value], dtype=dtype, device=device)
    return torch.full((num_heads,), bool(value) if flag else float(value), dtype=dtype, device=device)


def _is_bool(x) -> bool:
    """A Python or NumPy bool (``numpy.bool_`` is no subclass of bool)."""
    return isinstance(x, bool) or type(x).__name__ == "bool_"


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory on ``device`` (a CUDA device's total, the host's physical memory for the CPU),
    or None where unknown (meta and other devices)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            return None
    return None


def check_state_size(what: str, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device,
                     hint: str) -> None:
    """Refuse, before allocating anything, a computation whose M-sized tensors ``shapes`` (name ->
    shape, exact Python ints: M may be 2**62) in ``dtype`` would not fit in ``device``'s memory: a
    ValueError naming ``what`` needs them, their sizes, and ``hint`` (what to do instead). Without
    it torch fails late with "Storage size calculation overflowed" or a petabyte allocation."""
    item = torch.empty((), dtype=dtype).element_size()
    needed = sum(math.prod(shape) for shape in shapes.values()) * item
    available = device_memory(device)
    if available is None or needed <= available:
        return
    sizes = ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items())
    raise ValueError(f"{what} builds {sizes} in {dtype}: {needed:.3g} bytes, more than the {available:.3g} bytes of "
                     f"memory on {device}; {hint}")
