"""Where a result came from: the device, the package versions and the commit measured.

Every results file (MQAR rows, benchmark JSON, ``ramnet info``) takes these from here. The commit is
``RAMNET_GIT_REV`` when set: copies without ``.git``, or with a stale one (the device machine's), pass
the revision of the tree they run explicitly.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

GIT_REV_ENV = "RAMNET_GIT_REV"


def device_name(device) -> str:
    """``cuda (NVIDIA H200)`` or ``cpu (x86_64, 2 threads)``."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@functools.cache
def git_revision() -> str | None:
    """The measured commit: ``$RAMNET_GIT_REV`` if set, else ``git describe --always --dirty`` of the
    checkout this package runs from, else None (no git)."""
    if os.environ.get(GIT_REV_ENV):
        return os.environ[GIT_REV_ENV]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def package_version(distribution: str, module: str | None = None) -> str | None:
    """The installed version of ``distribution`` (None when it is not installed); ``module`` is tried
    by import when the distribution has no metadata (a package on PYTHONPATH)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return getattr(__import__(module or distribution), "__version__", "unknown")
    except Exception:  # noqa: BLE001 - an optional package that fails to import is "not there"
        return None


def environment(device) -> dict:
    """``device``, ``python``, ``torch``, ``triton``, ``transformers``, ``fla``, ``ramnet`` versions,
    ``git_rev`` and ``address_decoder`` (``ops.address.cuda.DECODER``: which forward of the address decoder
    the training paths ran on CUDA): the ``meta`` block of every results file."""
    from . import __version__
    from .ops.address import cuda as address_cuda

    return dict(
        device=device_name(device), python=platform.python_version(), torch=torch.__version__,
        triton=package_version("triton"), transformers=package_version("transformers"),
        fla=package_version("flash-linear-attention", "fla"), ramnet=__version__, git_rev=git_revision(),
        address_decoder=address_cuda.DECODER,
    )
