"""Recording the slots that every token writes and reads, per RAM layer and head.

The recorder wraps the ``run`` and ``step`` of each traced layer's ``RAMMemory`` (instance attributes
that shadow the methods for the duration of a ``with``): those are the calls that hand the op the
layer's projected ``q, k`` (short convolution and ``e^alpha`` scales applied), whatever path runs the
op. From them it decodes the addresses with the op's own ``decode_tokens`` (the address decoder,
CAPE included, and the write decay) at the positions the op uses (``state.offset`` onwards), so a
trace shows the physical slots that the op touches, not a re-implementation of the decoder. The op's
result is left as it is: recording changes no output.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from ..ops.checks import compute_dtype
from ..ops.ram.common import decode_tokens


@dataclass
class LayerTrace:
    """The decoded addresses of every token of one RAM layer: ``write_idx, read_idx [B, T, H, K]`` (int64
    slots after CAPE) and their weights ``write_w, read_w [B, T, H, K]`` (float32)."""

    layer: int
    memory_slots: int
    topk: int
    cape: tuple[bool, ...]
    write_idx: np.ndarray
    write_w: np.ndarray
    read_idx: np.ndarray
    read_w: np.ndarray

    @property
    def num_heads(self) -> int:
        return self.write_idx.shape[2]

    @property
    def num_tokens(self) -> int:
        return self.write_idx.shape[1]


@dataclass
class _Pieces:
    """What one layer's memory was called with so far: a list of ``[B, T_i, H, K]`` chunks per field."""

    memory: object
    write_idx: list = field(default_factory=list)
    write_w: list = field(default_factory=list)
    read_idx: list = field(default_factory=list)
    read_w: list = field(default_factory=list)

    def add(self, q: torch.Tensor, k: torch.Tensor, offset: torch.Tensor | None) -> None:
        compute = compute_dtype(q.dtype)
        spec = self.memory.spec(q.to(compute))
        batch, seq_len = q.shape[:2]
        if offset is None:
            offset = torch.zeros(batch, dtype=torch.long, device=q.device)
        positions = offset[:, None].to(q.device) + torch.arange(seq_len, device=q.device)
        with torch.no_grad():
            write_idx, write_w, _, read_idx, read_w = decode_tokens(q.detach().to(compute), k.detach().to(compute),
                                                                    spec, positions)
        for name, value in (("write_idx", write_idx), ("write_w", write_w), ("read_idx", read_idx),
                            ("read_w", read_w)):
            getattr(self, name).append(value.cpu())

    def finish(self, layer: int) -> LayerTrace:
        def cat(parts, dtype):
            return torch.cat(parts, dim=1).numpy().astype(dtype)

        memory = self.memory
        return LayerTrace(layer, memory.memory_slots, memory.topk, tuple(memory.cape),
                          cat(self.write_idx, np.int64), cat(self.write_w, np.float32),
                          cat(self.read_idx, np.int64), cat(self.read_w, np.float32))


def ram_layers(model) -> dict[int, torch.nn.Module]:
    """``{layer index: mixer}`` of the RAM layers (``RAMAttention``) of a RAM-Net model (or its
    ``.model``); hybrid and attention layers are left out (a hybrid's RAM memory writes with a delay,
    through chunked calls, so its calls are not one token's slots)."""
    from ..layers import RAMAttention

    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers: ramnet trace needs a RAM-Net model")
    return {i: layer.attn for i, layer in enumerate(layers) if isinstance(getattr(layer, "attn", None), RAMAttention)}


@contextlib.contextmanager
def recording(model, layers: list[int] | None = None):
    """Within the ``with``, every call of the chosen RAM layers' memories (``layers``: indices into
    ``model.layers``; None: all RAM layers) is recorded. Yields a dict ``{layer: _Pieces}``; call
    ``finish_traces`` on it after the ``with`` for the ``LayerTrace`` of each layer."""
    found = ram_layers(model)
    if not found:
        raise ValueError("the model has no RAM layers (mixer_types 'ramnet') to trace")
    chosen = sorted(found) if layers is None else list(layers)
    missing = [i for i in chosen if i not in found]
    if missing:
        raise ValueError(f"layers {missing} are not RAM layers of this model; its RAM layers are {sorted(found)}")
    pieces = {i: _Pieces(found[i].memory) for i in chosen}
    for i in chosen:
        memory, record = found[i].memory, pieces[i]

        def run(q, k, v, beta, state, cu_seqlens, output_final_state, _memory=memory, _record=record):
            if cu_seqlens is not None:
                raise ValueError("ramnet trace records unpadded sequences only (the padded tokens would have no slots)")
            _record.add(q, k, None if state is None else state.offset)
            return type(_memory).run(_memory, q, k, v, beta, state, cu_seqlens, output_final_state)

        def step(q, k, v, state, _memory=memory, _record=record):
            _record.add(q[:, None], k[:, None], state.offset)  # before the step moves the offset on
            return type(_memory).step(_memory, q, k, v, state)

        memory.run, memory.step = run, step
    try:
        yield pieces
    finally:
        for i in chosen:
            for name in ("run", "step"):
                found[i].memory.__dict__.pop(name, None)


def finish_traces(pieces: dict) -> list[LayerTrace]:
    empty = [i for i, p in pieces.items() if not p.write_idx]
    if empty:
        raise ValueError(f"layers {empty} were not called while recording")
    return [p.finish(i) for i, p in pieces.items()]


@torch.no_grad()
def record_trace(model, input_ids: torch.Tensor, layers: list[int] | None = None,
                 chunk_size: int | None = None) -> list[LayerTrace]:
    """The ``LayerTrace`` of each chosen RAM layer (``layers``: None for all) over ``input_ids [B, T]``,
    read by ``model`` in one forward or, with ``chunk_size``, in chunks of that many tokens continued
    through a ``RAMNetCache`` (the positions and states carry over: the same slots as one forward)."""
    from ..models import RAMNetCache
    from ..models.ramnet.modeling_ramnet import CACHE_FIELD

    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [B, T] with T >= 1, got {tuple(input_ids.shape)}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    with recording(model, layers) as pieces:
        if chunk_size is None or chunk_size >= input_ids.shape[1]:
            model(input_ids=input_ids, use_cache=False)
        else:
            cache = RAMNetCache()
            for start in range(0, input_ids.shape[1], chunk_size):
                model(input_ids=input_ids[:, start:start + chunk_size], **{CACHE_FIELD: cache}, use_cache=True)
    return finish_traces(pieces)


__all__ = ["LayerTrace", "finish_traces", "ram_layers", "record_trace", "recording"]
