"""The generation cache of RAM-Net: per layer, a fixed-size recurrent state and/or a window of keys and values.

Subclasses transformers' `Cache` so that `generate()` treats it like any other cache (beam reordering,
batch selection, returning it to the caller). RAM layers keep only their state; hybrid layers keep their
fast-weight state plus a `KVWindow` (their last keys and values); attention layers keep only a window.
The layers manage their windows themselves, so the KV-specific parts of `Cache` (`update`, masks,
cropping) do not apply.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import Cache

from ..layers.kv_window import KVWindow
from ..layers.memories import DeltaState
from ..ops import RAMState


class RAMNetCacheLayer:
    """The recurrent state of one layer (a `RAMState`, or DeltaNet's fast weights in a hybrid layer) and
    the `KVWindow` of hybrid and attention layers; each is `None` until the layer stores one."""

    # The state replaces itself on every step (and starts as None), so there is no static buffer
    # for torch.compile/cudagraphs to reuse, and no past copy to roll back to.
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
        if self.state is not None:
            self.state = type(self.state)(*(fn(t) for t in self.state))
        if self.window is not None:
            self.window = KVWindow(*(None if t is None else fn(t) for t in self.window))
        if self.conv_history is not None:
            self.conv_history = fn(self.conv_history)

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

    `RAMAttention` reads its state with `get_state(layer_idx)` and stores the new one with
    `update_state(layer_idx, state, num_new_tokens)`. Hybrid and attention layers also read their
    window with `get_window(layer_idx)` and pass the new one as `update_state(..., window=...)`.
    """

    # Shadows the base property, which would report True for a cache with no layers yet.
    is_croppable = False

    def __init__(self):
        super().__init__(layer_class_to_replicate=RAMNetCacheLayer)

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
        layer = self.layers[layer_idx]
        layer.state = state
        layer.window = window
        layer.conv_history = conv_history
        layer.seen_tokens += num_new_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0


__all__ = ["RAMNetCache", "RAMNetCacheLayer"]
