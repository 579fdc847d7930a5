"""A small language model for synthetic tasks, with a pluggable token mixer (Zoology's conventions).

Layout: token embedding (no positional embedding) -> embedding dropout -> ``n_layers`` pre-norm
blocks ``x + mixer(LN(x))`` then, if ``mlp_mult > 0``, ``x + MLP(LN(x))`` -> LayerNorm -> LM head
tied to the embedding. With ``short_conv = k > 0`` the first block's mixer is Zoology's ``BaseConv``
(a gated short convolution of kernel k, as in the Based MQAR configs: ``Hybrid([conv, mixer])``
over 2 layers); the other blocks use the configured mixer. Weights are initialised as in Zoology:
normal(0.02) for linear and embedding weights, zero biases, output projections scaled by
``1/sqrt(2 n_layers)``. One departure: Zoology's block with an Identity state mixer (its MQAR
configs, our ``mlp_mult = 0``) adds ``LN(x)`` back into the residual stream; ours adds nothing.

A mixer spec is ``{"name": registered name}`` or ``{"path": "package.module.Class"}``, plus
``"kwargs"`` for every layer and optionally ``"per_layer"`` (one dict per mixer layer, merged over
``kwargs``); a kwarg written "d_model", "d_model*k" or "d_model/k" follows the model width. The
class is built as ``Class(hidden_size=d_model, layer_idx=i, **kwargs)`` and called with fla's
signature; the first element of its output is the mixed sequence.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.checks import check_int
from .mixers import check_dropout

# name -> dotted path. The fla entries are the paper's MQAR baselines as flash-linear-attention
# names them; fla has no H3, which is written here (ramnet/mqar/h3.py).
MIXERS = {
    "ramnet": "ramnet.layers.RAMAttention",
    "hybrid": "ramnet.layers.HybridRAMAttention",
    "attention": "ramnet.mqar.mixers.ZoologyAttention",
    "sliding_window": "ramnet.mqar.mixers.ZoologySlidingWindowAttention",
    "linear_attention": "ramnet.mqar.mixers.BasedLinearAttention",
    "h3": "ramnet.mqar.h3.H3",
    "fla.GLA": "fla.layers.GatedLinearAttention",
    "fla.DeltaNet": "fla.layers.DeltaNet",
    "fla.GatedDeltaNet": "fla.layers.GatedDeltaNet",
    "fla.RWKV7": "fla.layers.RWKV7Attention",
    "fla.Mamba2": "fla.layers.Mamba2",
    "fla.Mamba": "fla.layers.Mamba",
    "fla.Raven": "fla.layers.Raven",
}
SPEC_KEYS = {"name", "path", "kwargs", "per_layer"}


def _conv_states(layer) -> int:
    return sum(m.in_channels * m.kernel_size[0] for m in layer.modules() if type(m).__name__ == "ShortConvolution")


# Zoology's per-layer state formulas for classes that have no state_size method of their own, keyed
# by the class's full name, with the attribute names of fla 0.6.0's layers. Counts are floats of one
# sequence: what the layer must carry to go on decoding. Where Zoology's own count leaves out the
# layer's short convolution, the rows marked "+ conv" add it (spec section 8: "+ conv state"):
# - GLA: key_dim * head_v_dim, + its ShortConvolution's in_channels * kernel.
# - DeltaNet, Gated DeltaNet: H d_k d_v (Zoology's, as the spec writes it; their ShortConvolutions
#   are not counted, so the stored rows stay comparable).
# - RWKV-7: H d_h^2 (H d_k d_v: fla's value_dim may differ), + the token shift's previous token,
#   hidden_size floats (fla caches it as the layer's conv_state).
# - Mamba2 and Mamba: 2 d d_state, Zoology's (the SSM state d_inner d_state at fla's default expand 2),
#   + the causal conv1d's channels * kernel (conv_dim = d_inner + 2 groups d_state for Mamba2,
#   d_inner for Mamba).
# - Raven: its two slot memories per head, keys [slots, d_k] and values [slots, d_v] (fla's GSA
#   kernels carry both as the recurrent state (hk, hv)): H * slots * (d_k + d_v). Raven has no
#   short convolution (fla refuses use_short_conv).
STATE_FORMULAS = {
    "fla.layers.gla.GatedLinearAttention": lambda m, L: m.key_dim * m.head_v_dim + _conv_states(m),
    "fla.layers.delta_net.DeltaNet": lambda m, L: m.num_heads * m.head_k_dim * m.head_v_dim,
    "fla.layers.gated_deltanet.GatedDeltaNet": lambda m, L: m.num_v_heads * m.head_k_dim * m.head_v_dim,
    "fla.layers.rwkv7.RWKV7Attention": lambda m, L: m.num_heads * m.head_dim * m.head_v_dim + m.hidden_size,
    "fla.layers.mamba2.Mamba2": lambda m, L: 2 * m.hidden_size * m.ssm_state_size + m.conv_dim * m.conv_kernel_size,
    "fla.layers.mamba.Mamba": lambda m, L: (2 * m.hidden_size * m.ssm_state_size
                                            + m.intermediate_size * m.conv_kernel_size),
    "fla.layers.raven.Raven": lambda m, L: m.num_heads * m.num_slots * (m.head_k_dim + m.head_v_dim),
}


def mixer_state_size(layer: nn.Module, seq_len: int) -> int | None:
    """State of one mixer layer in floats, or None when neither it nor ``STATE_FORMULAS`` knows."""
    if callable(getattr(layer, "state_size", None)):
        return int(layer.state_size(seq_len))
    cls = type(layer)
    formula = STATE_FORMULAS.get(f"{cls.__module__}.{cls.__qualname__}")
    return None if formula is None else int(formula(layer, seq_len))


def check_mixer_spec(spec) -> dict:
    """Raise ValueError naming what is wrong with the form of a mixer spec; return it. Nothing is
    imported (``resolve_mixer`` does that), so a spec of an fla layer checks on any machine."""
    if not isinstance(spec, dict) or set(spec) - SPEC_KEYS or ("name" in spec) == ("path" in spec):
        raise ValueError(f"a mixer spec is a dict with exactly one of 'name' or 'path', and optional "
                         f"'kwargs' and 'per_layer', got {spec!r}")
    if not isinstance(spec.get("kwargs", {}), dict):
        raise ValueError(f"a mixer spec's 'kwargs' must be a dict, got {spec['kwargs']!r}")
    if "name" in spec and spec["name"] not in MIXERS:
        raise ValueError(f"unknown mixer name {spec['name']!r}; known: {', '.join(MIXERS)} (or give 'path')")
    if not str(mixer_path(spec)).rpartition(".")[0]:
        raise ValueError(f"mixer path must be 'package.module.Class', got {mixer_path(spec)!r}")
    return spec


def mixer_path(spec: dict) -> str:
    """The dotted path of the class a (checked) mixer spec names."""
    return MIXERS[spec["name"]] if "name" in spec else spec["path"]


def resolve_mixer(spec: dict):
    """The class a mixer spec names, with a clear error for a bad spec or a missing package."""
    path = mixer_path(check_mixer_spec(spec))
    module_name, _, attr = str(path).rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        if module_name.split(".")[0] == "fla":
            raise ImportError(f"mixer {path} comes from flash-linear-attention, which is not installed "
                              f"({err}); install it on a CUDA machine: pip install 'ramnet[baselines]'") from err
        raise ImportError(f"cannot import the module of mixer {path}: {err}") from err
    if not hasattr(module, attr):
        raise ValueError(f"mixer path {path!r}: module {module_name} has no {attr!r}")
    return getattr(module, attr)


def needs_cuda(spec: dict) -> bool:
    """fla's layers run Triton kernels: they need a CUDA device."""
    return str(mixer_path(check_mixer_spec(spec))).split(".")[0] == "fla"


def _mixer_kwargs(spec: dict, index: int, num_mixers: int, d_model: int) -> dict:
    kwargs = dict(spec.get("kwargs", {}))
    per_layer = spec.get("per_layer")
    if per_layer is not None:
        if not isinstance(per_layer, list) or len(per_layer) != num_mixers or not all(
                isinstance(d, dict) for d in per_layer):
            raise ValueError(f"per_layer must be a list of {num_mixers} dicts (one per mixer layer), got {per_layer!r}")
        kwargs.update(per_layer[index])
    return {key: resolve_d_model(value, d_model) for key, value in kwargs.items()}


def resolve_d_model(value, d_model: int):
    """Sizes that follow the model width are written "d_model", "d_model*k" or "d_model/k" in a
    spec (so one preset serves every d_model); anything else passes through unchanged."""
    if not isinstance(value, str) or not value.startswith("d_model"):
        return value
    match = re.fullmatch(r"d_model(?:([*/])(\d+))?", value.replace(" ", ""))
    if match is None:
        raise ValueError(f"a d_model size must be 'd_model', 'd_model*k' or 'd_model/k' with an int k, got {value!r}")
    op, k = match.group(1), int(match.group(2) or 1)
    if op == "/" and d_model % k:
        raise ValueError(f"{value!r}: d_model {d_model} is not divisible by {k}")
    return d_model * k if op == "*" else d_model // k


class ShortConv(nn.Module):
    """Zoology's ``BaseConv`` with a short kernel: ``conv(u) * proj(u) + u``, with a causal
    depthwise convolution. It lets a token see its predecessors, which MQAR needs to bind a value
    to the key before it. State: the last ``kernel`` inputs, ``d kernel``."""

    def __init__(self, hidden_size: int, kernel_size: int = 3):
        super().__init__()
        self.hidden_size, self.kernel_size = hidden_size, kernel_size
        self.conv = nn.Conv1d(hidden_size, hidden_size, kernel_size, groups=hidden_size, padding=kernel_size - 1)
        self.projection = nn.Linear(hidden_size, hidden_size)

    def forward(self, u: torch.Tensor, **kwargs) -> torch.Tensor:
        conv = self.conv(u.transpose(1, 2))[..., : u.shape[1]].transpose(1, 2)
        return conv * self.projection(u) + u

    def state_size(self, seq_len: int) -> int:
        return self.hidden_size * self.kernel_size


class MLP(nn.Module):
    """Zoology's MLP: ``fc2(gelu(fc1(x)))`` with ``mult * d`` hidden units."""

    def __init__(self, hidden_size: int, mult: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mult * hidden_size)
        self.fc2 = nn.Linear(mult * hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d_model: int, mixer: nn.Module, mlp_mult: int):
        super().__init__()
        self.mixer_norm, self.mixer = nn.LayerNorm(d_model), mixer
        self.mlp_norm = nn.LayerNorm(d_model) if mlp_mult else None
        self.mlp = MLP(d_model, mlp_mult) if mlp_mult else None

    def forward(self, x: torch.Tensor, mixer_kwargs: dict):
        out = self.mixer(self.mixer_norm(x), **mixer_kwargs)
        extra = {}
        if isinstance(out, tuple):
            # fla's RWKV-7 returns the first layer's values as a 4th output, and later layers need them.
            if len(out) > 3:
                extra["v_first"] = out[3]
            out = out[0]
        x = x + out
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x, extra


class MQARModel(nn.Module):
    """The synthetic-task LM (see the module docstring). ``forward(input_ids, select=None)``
    returns logits ``[B, T, V]``, or ``[n, V]`` at the n positions where the boolean ``select``
    is True: the LM head is the costliest part at d_model 64 and MQAR only scores query positions."""

    def __init__(self, vocab_size: int, d_model: int, mixer: dict, n_layers: int = 2, short_conv: int = 3,
                 mlp_mult: int = 0, embed_dropout: float = 0.1):
        super().__init__()
        for name, value, low in (("vocab_size", vocab_size, 2), ("d_model", d_model, 1), ("n_layers", n_layers, 1),
                                 ("short_conv", short_conv, 0), ("mlp_mult", mlp_mult, 0)):
            check_int(name, value, low)
        if short_conv and n_layers < 2:
            raise ValueError("short_conv replaces the first layer's mixer, so it needs n_layers >= 2")
        check_dropout("embed_dropout", embed_dropout)
        cls = resolve_mixer(mixer)
        self.mixer_spec = mixer
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.embed_dropout = nn.Dropout(embed_dropout)
        num_mixers = n_layers - (1 if short_conv else 0)
        mixers = [ShortConv(d_model, short_conv)] if short_conv else []
        # layer_idx counts the mixer layers only: fla layers use it to find their cache slot, and
        # RWKV-7 treats layer 0 as the one that provides v_first.
        # Layers that initialise by depth (fla's RWKV-7 divides by num_hidden_layers - 1) learn the
        # model's depth unless the spec sets it.
        knows_depth = "num_hidden_layers" in inspect.signature(cls.__init__).parameters
        for i in range(num_mixers):
            kwargs = _mixer_kwargs(mixer, i, num_mixers, d_model)
            if knows_depth:
                kwargs.setdefault("num_hidden_layers", n_layers)
            try:
                mixers.append(cls(hidden_size=d_model, layer_idx=i, **kwargs))
            except TypeError as err:
                raise ValueError(f"cannot build mixer {cls.__module__}.{cls.__qualname__} with kwargs "
                                 f"{mixer.get('kwargs', {})}: {err}") from err
        self.blocks = nn.ModuleList(Block(d_model, m, mlp_mult) for m in mixers)
        self.final_norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights(n_layers)
        self.lm_head.weight = self.embedding.weight

    def _init_weights(self, n_layers: int):
        # Parameters a layer marks ``_no_reinit`` (fla's Mamba dt bias) keep their own init.
        def fresh(p):
            return p is not None and not getattr(p, "_no_reinit", False)

        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and fresh(module.weight):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and fresh(module.bias):
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "fc2.weight")) and fresh(p):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers))

    def forward(self, input_ids: torch.Tensor, select: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_dropout(self.embedding(input_ids))
        extra: dict = {}
        for block in self.blocks:
            x, new = block(x, extra)
            extra.update(new)
        x = self.final_norm(x)
        return self.lm_head(x if select is None else x[select])

    def mixers(self) -> list[nn.Module]:
        return [block.mixer for block in self.blocks]

    def state_size(self, seq_len: int) -> int | None:
        """Total recurrent state in floats over all layers (Zoology's formulas), or None if a
        mixer's is unknown. Zoology's own ``LanguageModel.state_size`` returns 4x this (bytes in fp32)."""
        sizes = [mixer_state_size(m, seq_len) for m in self.mixers()]
        return None if None in sizes else sum(sizes)
