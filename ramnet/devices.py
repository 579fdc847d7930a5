"""Device selection shared by the command-line tasks."""

from __future__ import annotations

import torch


def resolve_device(name: str | None) -> torch.device:
    """``None`` or ``"auto"``: the GPU when torch sees one, else the CPU; otherwise the named device,
    refusing a CUDA device that is not there (rather than failing later, mid-run)."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda was asked for, but torch sees no CUDA GPU")
    return device
