"""The generation caches of RAM-Net: per layer, a fixed-size recurrent state and/or a window of keys and values.

Both subclass transformers' `Cache` so that `generate()` treats them like any other cache (beam
reordering, batch selection, returning it to the caller). RAM layers keep only their state; hybrid
layers keep their fast-weight state plus a `KVWindow` (their last keys and values); attention layers
keep only a window. The layers manage their windows themselves, so the KV-specific parts of `Cache`
(`update`, masks, cropping) do not apply.

`RAMNetCache` (dynamic) stores whatever state a layer hands it. `RAMNetStaticCache` (RAM layers only)
keeps fixed buffers, allocated at the first write (the prompt) and updated in place after that, so
their addresses never change and it `is_compileable`: `generate` then runs each decoding step through
`torch.compile(mode="reduce-overhead")`, i.e. captured in a CUDA graph and replayed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import Cache

from ..layers.kv_window import KVWindow
from ..layers.memories import DeltaState
from ..ops import RAMState
from ..states import RAM_STATES, make_store
from ..states.base import SlotStore


class RAMNetCacheLayer:
    """The recurrent state of one layer (a `RAMState`, or DeltaNet's fast weights in a hybrid layer) and
    the `KVWindow` of hybrid and attention layers; each is `None` until the layer stores one."""

    # The state is whatever the layer stores (None until then, a new tensor after every prompt, a
    # window that grows and shrinks), so there is no fixed buffer for torch.compile/cudagraphs to
    # reuse (RAMNetStaticCacheLayer has them), and no past copy to roll back to.
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self):
        self.state: RAMState | DeltaState | None = None
        self.window: KVWindow | None = None
        # The last inputs of a RAM layer's short convolution ([B, size - 1, C]), when it has one.
        self.conv_history: torch.Tensor | None = None
        # Input columns consumed, padding included: what `generate` means by the cache's length.
        # The per-sequence count of real tokens lives in `state.offset` (RAM layers) or `window.seen`.
        self.seen_tokens = 0

    def __repr__(self):
        return f"{self.__class__.__name__}(seen_tokens={self.seen_tokens})"

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1  # a recurrent state has no length limit

    def reset(self) -> None:
        self.state = None
        self.window = None
        self.conv_history = None
        self.seen_tokens = 0

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        # Every tensor of a state (S, z, offset) or a window has the sequences on dim 0.
        if isinstance(self.state, SlotStore):  # a sparse or host-resident state maps its own tensors
            self.state.map_batch(fn)
        elif self.state is not None:
            self.state = type(self.state)(*(fn(t) for t in self.state))
        if self.window is not None:
            self.window = KVWindow(*(None if t is None else fn(t) for t in self.window))
        if self.conv_history is not None:
            self.conv_history = fn(self.conv_history)

    def store(self, state: RAMState | DeltaState | None, window: KVWindow | None, conv_history: torch.Tensor | None,
              num_new_tokens: int) -> None:
        """What a layer leaves after `num_new_tokens` more input columns (padding included)."""
        self.state = state
        self.window = window
        self.conv_history = conv_history
        self.seen_tokens += num_new_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("RAM-Net's recurrent state cannot be rolled back to an earlier position")


class RAMNetCache(Cache):
    """Per-layer recurrent states of a RAM-Net model, created lazily as layers write to it.

    `RAMAttention` reads its state with `get_ram_state(layer_idx)` and stores the new one with
    `update_state(layer_idx, state, num_new_tokens)`. Hybrid and attention layers read theirs with
    `get_state(layer_idx)`, and their window with `get_window(layer_idx)`, and pass the new one as
    `update_state(..., window=...)`.

    `ram_state` picks how the RAM layers keep their state (``ramnet.states``, docs/trace.md): `"dense"`
    (a `RAMState` on the device; the default), `"sparse"` (only the written slots, for very large M) or
    `"offload"` (the state in host memory, a device cache of hot slots; `state_options` are
    `OffloadState`'s: `budget`, `slots`, `ways`, `policy`, `prefill`). All three give the same outputs.
    Hybrid layers keep dense states whatever `ram_state` says.
    """

    # Shadows the base property, which would report True for a cache with no layers yet.
    is_croppable = False

    def __init__(self, layers: list[RAMNetCacheLayer] | None = None, ram_state: str = "dense", **state_options):
        if ram_state not in RAM_STATES:
            raise ValueError(f"ram_state must be one of {RAM_STATES}, got {ram_state!r}")
        if ram_state == "dense" and state_options:
            raise ValueError(f"the dense state takes no options, got {sorted(state_options)}")
        if ram_state != "dense":
            make_store(ram_state, **state_options)  # the options checked now, not at the first write
        self.ram_state, self.state_options = ram_state, state_options
        # Layers are created as they first write, unless given (RAMNetStaticCache gives them all).
        if layers is None:
            super().__init__(layer_class_to_replicate=RAMNetCacheLayer)
        else:
            super().__init__(layers=layers)

    def get_ram_state(self, layer_idx: int):
        """A RAM layer's state: `get_state`'s, or before the layer's first write a new empty sparse or
        host-resident state (`ram_state`; None for the dense state, which the op creates)."""
        state = self.get_state(layer_idx)
        if state is None and self.ram_state != "dense":
            return make_store(self.ram_state, **self.state_options)
        return state

    def get_state(self, layer_idx: int) -> RAMState | DeltaState | None:
        return self.layers[layer_idx].state if layer_idx < len(self.layers) else None

    def get_window(self, layer_idx: int) -> KVWindow | None:
        return self.layers[layer_idx].window if layer_idx < len(self.layers) else None

    def get_conv_history(self, layer_idx: int) -> torch.Tensor | None:
        return self.layers[layer_idx].conv_history if layer_idx < len(self.layers) else None

    def update_state(
        self, layer_idx: int, state: RAMState | DeltaState | None, num_new_tokens: int, window: KVWindow | None = None,
        conv_history: torch.Tensor | None = None,
    ) -> None:
        while len(self.layers) <= layer_idx:
            self.layers.append(self.layer_class_to_replicate())
        self.layers[layer_idx].store(state, window, conv_history, num_new_tokens)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0


def _static(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, tagged as a fixed address: torch.compile's cudagraphs then read and update it in place
    in every replay, as transformers' own static caches do, instead of copying it in and out."""
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(tensor)
    return tensor


class RAMNetStaticCacheLayer(RAMNetCacheLayer):
    """A RAM layer's state and short-convolution history in fixed buffers: copies of the first state
    stored (the prompt's, from the op), then updated in place; `seen_tokens` is a device counter, so
    that a captured step does not depend on a Python int that changes every token.

    The decoding step (`RAMAttention` through `RAMMemory.step`) updates the buffers themselves and
    stores the same state back, which costs nothing here."""

    is_compileable = True  # shapes and addresses are fixed once the prompt has been stored

    def __init__(self):
        super().__init__()
        self.length: torch.Tensor | None = None  # int64 [], input columns consumed

    def __repr__(self):
        return f"{self.__class__.__name__}(allocated={self.state is not None})"

    def get_seq_length(self) -> int:
        # A host read: transformers asks before the prompt only, not in the decoding loop.
        return 0 if self.length is None else int(self.length)

    def store(self, state, window, conv_history, num_new_tokens: int) -> None:
        if window is not None or isinstance(state, DeltaState):
            raise TypeError("RAMNetStaticCache holds RAM layers' states only; hybrid and attention layers need RAMNetCache")
        if state is None:
            raise ValueError("RAMNetStaticCache stores a state with every write (use_cache=True)")
        if self.state is None:  # the first write: allocate the buffers
            self.state = RAMState(*(_static(t.clone()) for t in state))
            self.conv_history = None if conv_history is None else _static(conv_history.clone())
            self.length = _static(torch.zeros((), dtype=torch.long, device=state.S.device))
        else:
            if state is not self.state:  # a decoding step stores the buffers it updated: nothing to copy
                self.state = RAMState(*(_assign(buffer, new, "state") for buffer, new in zip(self.state, state)))
            if conv_history is not None:  # the convolution's history is a new tensor after every call
                self.conv_history = _assign(self.conv_history, conv_history, "conv_history")
        self.length.add_(num_new_tokens)

    def reset(self) -> None:
        """Back to the state before any token, in the same buffers (a compiled step stays valid)."""
        if self.state is not None:
            S, z, offset = self.state
            S.zero_()
            z.fill_(1.0 / z.shape[-1])  # RAMState.empty's z = 1/M
            offset.zero_()
            self.length.zero_()
            if self.conv_history is not None:
                self.conv_history.zero_()

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        # Beam reordering keeps the shapes: in place, so the buffers keep their addresses. A change of
        # batch size (repeat, select) needs new buffers.
        if self.state is not None:
            self.state = RAMState(*(_assign(t, fn(t), None) for t in self.state))
        if self.conv_history is not None:
            self.conv_history = _assign(self.conv_history, fn(self.conv_history), None)


def _assign(buffer: torch.Tensor, value: torch.Tensor, name: str | None) -> torch.Tensor:
    """`value` written into `buffer` when the shapes match, else (`name` None) `value` as the new buffer."""
    if value is buffer:
        return buffer
    if value.shape == buffer.shape:
        return buffer.copy_(value)
    if name is not None:
        raise ValueError(f"RAMNetStaticCache keeps the shapes of its first write: {name} {tuple(buffer.shape)}, got "
                         f"{tuple(value.shape)} (reset() keeps the buffers; a new batch size needs a new cache)")
    return _static(value.clone())


class RAMNetStaticCache(RAMNetCache):
    """`RAMNetCache` in fixed buffers, for models whose token mixers are all RAM layers (`mixer_types` all
    "ramnet"): what `generate` uses on CUDA by default, or with `cache_implementation="static"`.

    One `RAMNetStaticCacheLayer` per layer from the start (transformers' `Cache.is_compileable` needs
    them), each allocating its buffers from the first state it stores, the prompt's; after that every
    write is in place. The config is checked here, once; the decoding steps check nothing."""

    def __init__(self, config):
        check_static_cache_config(config)
        super().__init__(layers=[RAMNetStaticCacheLayer() for _ in range(config.num_hidden_layers)])


def _other_mixers(config) -> list[str]:
    from .ramnet.configuration_ramnet import RAMNetConfig  # here: the model's module imports this one

    if not isinstance(config, RAMNetConfig):
        raise TypeError(f"config must be a RAMNetConfig, got {type(config).__name__}")
    return sorted({kind for kind in config.mixer_types if kind != "ramnet"})


def check_static_cache_config(config) -> None:
    """A ValueError unless `config` (a RAMNetConfig) has RAM layers only."""
    others = _other_mixers(config)
    if others:
        raise ValueError(f"RAMNetStaticCache holds RAM layers' fixed-size states only, but config.mixer_types has "
                         f"{others}: use RAMNetCache (cache_implementation='dynamic') for hybrid and attention layers")


def static_cache_supported(config) -> bool:
    return not _other_mixers(config)


__all__ = ["RAMNetCache", "RAMNetCacheLayer", "RAMNetStaticCache", "RAMNetStaticCacheLayer"]
