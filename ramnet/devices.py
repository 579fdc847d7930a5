"""Device selection shared by the command-line tasks."""

from __future__ import annotations

import torch


def resolve_device(name: str | None, option: str = "--device") -> torch.device:
    """``None`` or ``"auto"``: the GPU when torch sees one, else the CPU; otherwise the named device,
    refusing a CUDA device that is not there (rather than failing later, mid-run). ``option`` is how
    the error messages name the setting (the LM trainer's is a config key)."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"{option} {name!r}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option}: cuda was asked for, but torch sees no CUDA GPU")
    return device


def local_device(name: str | None, local_rank: int, option: str = "--device") -> torch.device:
    """``resolve_device``, where a CUDA device without an index is this process's GPU, ``cuda:LOCAL_RANK``
    (torchrun starts one process per GPU of a node)."""
    device = resolve_device(name, option)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device
