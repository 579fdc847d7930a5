"""How ``RAMAttention`` reads and writes its entry of a generation cache, under either of the two
protocols it is used with:

- RAM-Net's ``RAMNetCache`` (``ramnet.models``): ``get_state(layer_idx)``, ``get_conv_history(layer_idx)``
  and ``update_state(layer_idx, state, num_new_tokens, conv_history=...)``;
- flash-linear-attention's ``Cache`` (``fla.models.utils.Cache``), which fla's own layers use:
  ``len(cache) > layer_idx`` once the layer has written, ``cache[layer_idx]`` a dict with
  ``"recurrent_state"`` and ``"conv_state"``, and ``cache.update(recurrent_state=..., conv_state=...,
  layer_idx=..., offset=num_new_tokens)``. With it, ``RAMAttention`` drops into an fla model's stack.

In fla's cache the layer keeps its ``RAMState`` as the recurrent state (fla's beam reordering maps
it to a plain tuple ``(S, z, offset)``, turned back into a ``RAMState`` on reading) and its short
convolution's history ``[B, size - 1, C]`` as the conv state; both have the sequences on dim 0, as
fla's batch operations expect.
"""

from __future__ import annotations

import functools
import inspect

import torch

from ..ops import RAMState


def _is_ramnet_cache(cache) -> bool:
    # Duck-typed: ramnet.models imports the layers, so the layers cannot import RAMNetCache.
    return hasattr(cache, "update_state") and hasattr(cache, "get_state")


@functools.cache
def _follows_fla_protocol(cache_type: type) -> bool:
    update = getattr(cache_type, "update", None)
    if update is None or not hasattr(cache_type, "__getitem__") or not hasattr(cache_type, "__len__"):
        return False
    return "recurrent_state" in inspect.signature(update).parameters


def _check(cache, layer_idx) -> bool:
    """True for a RAMNetCache, False for an fla Cache; a TypeError for anything else."""
    if layer_idx is None:
        raise ValueError("RAMAttention needs its layer_idx to use a cache (past_key_values): pass layer_idx=...")
    if _is_ramnet_cache(cache):
        return True
    if _follows_fla_protocol(type(cache)):
        return False
    raise TypeError(
        "past_key_values must be a RAMNetCache (ramnet.models) or a cache with fla's protocol (fla.models.utils.Cache: "
        f"cache[layer_idx] a dict of states, update(recurrent_state=..., layer_idx=...)), got {type(cache).__name__}"
    )


def read_layer_cache(cache, layer_idx) -> tuple[RAMState | None, torch.Tensor | None]:
    """``(state, conv_history)`` of layer ``layer_idx`` in ``cache`` (None, or None where the layer has
    not written yet)."""
    if cache is None:
        return None, None
    if _check(cache, layer_idx):
        # A RAM layer's state: `get_ram_state` (a fresh sparse or host-resident state before the first
        # write, when the cache was made with one) where the cache has it.
        get = getattr(cache, "get_ram_state", cache.get_state)
        return get(layer_idx), cache.get_conv_history(layer_idx)
    if len(cache) <= layer_idx:
        return None, None
    entry = cache[layer_idx]
    if not isinstance(entry, dict):
        raise TypeError(f"past_key_values[{layer_idx}] must be a dict of states (fla's Cache), got {type(entry).__name__}")
    state = entry.get("recurrent_state")
    return (None if state is None else RAMState(*state)), entry.get("conv_state")


def write_layer_cache(cache, layer_idx, state: RAMState, conv_history: torch.Tensor | None, num_new_tokens: int) -> None:
    """Store layer ``layer_idx``'s state after ``num_new_tokens`` input columns (padding included)."""
    if _check(cache, layer_idx):
        cache.update_state(layer_idx, state, num_new_tokens=num_new_tokens, conv_history=conv_history)
    else:
        cache.update(recurrent_state=state, conv_state=conv_history, layer_idx=layer_idx, offset=num_new_tokens)


__all__ = ["read_layer_cache", "write_layer_cache"]
