"""RAM-Net model configuration."""

from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.utils import logging

from ...layers.hybrid import BLENDS, FAST_WEIGHTS, MIXES
from ...layers.memories import DELTANET_ACTIVATIONS
from ...ops.checks import check_choice, check_int, check_positive, check_topk, memory_geometry
from ...ops.ram import PATHS
from ...ops.ram.spec import DEFAULT_PROXY_EPS

# The token mixer of each layer (`mixer_types`), and its name in transformers' `layer_types` vocabulary
# (`transformers.configuration_utils.ALLOWED_ATTN_LAYER_TYPES`, which transformers' config validator
# enforces): RAM-Net, a layer with a recurrent state, is transformers' "linear_attention".
LAYER_TYPE_OF_MIXER = {
    "ramnet": "linear_attention",
    "hybrid": "hybrid",
    "full_attention": "full_attention",
    "sliding_attention": "sliding_attention",
}
MIXER_TYPES = tuple(LAYER_TYPE_OF_MIXER)
MIXER_OF_LAYER_TYPE = {layer_type: mixer for mixer, layer_type in LAYER_TYPE_OF_MIXER.items()}

# Fields under their names before issue 14 renamed them: the config.json of older checkpoints
# still uses these, so they are accepted as aliases (and the new name is what gets saved).
# `layer_types` held the mixers in transformers' vocabulary.
RENAMED_FIELDS = {"cape_heads": "num_cape_heads", "layer_types": "mixer_types"}

logger = logging.get_logger(__name__)


def paper_num_cape_heads(num_hidden_layers: int, num_heads: int) -> list[int]:
    """The paper's LM schedule as it states it, in absolute layer numbers: CAPE on all heads of layers
    1-4, on half of them in layers 5-8, absolute addressing after that."""
    return [num_heads if i < 4 else num_heads // 2 if i < 8 else 0 for i in range(num_hidden_layers)]


def default_num_cape_heads(num_hidden_layers: int, num_heads: int) -> list[int]:
    """The paper's schedule in proportion to depth: its 27 layers put CAPE on all heads of the first 4
    (15%) and on half the heads of the next 4; a model of L layers does the same for its first
    round(4L/27) and next round(8L/27) - round(4L/27) layers. At 27 layers this is
    `paper_num_cape_heads`; shallower models keep the paper's share of CAPE heads (a CAPE head can only
    match keys at fixed offsets), where the absolute numbers would put CAPE on 75% of an 8-layer
    model's heads and on all of a 4-layer one's."""
    all_heads = round(num_hidden_layers * 4 / 27)
    half_heads = round(num_hidden_layers * 8 / 27) - all_heads
    return [num_heads if i < all_heads else num_heads // 2 if i < all_heads + half_heads else 0
            for i in range(num_hidden_layers)]


@strict
class RAMNetConfig(PreTrainedConfig):
    r"""
    Configuration of a RAM-Net language model (the defaults are the paper's 340M LM).

    Args:
        vocab_size (`int`): vocabulary size (Llama-2's by default).
        hidden_size (`int`): width of the residual stream.
        num_hidden_layers (`int`): number of blocks.
        num_heads (`int`): RAM attention heads per layer.
        head_v_dim (`int`): value (and output) dimension of each head, `d_v`.
        num_partitions (`int`): key partitions `U`; the key dimension is `U * partition_dim`.
        partition_dim (`int`): entries per partition `d_p`; the memory has `d_p ** U` slots.
        topk (`int`): slots read and written per token, `K`.
        gamma (`float` or `list[float]`): PDMA decay power (0 keeps everything, 1 is an EMA, larger
            forgets a written slot faster): one for every head, or one per head (`num_heads` entries, the
            same in every layer), e.g. a spread of time scales over the heads.
        tau (`float`): softmax temperature of the address decoder.
        eps (`float`): added to the PDMA normaliser before the read division.
        proxy_eps (`float`): smoothing of the proxy gradient of the decay.
        intermediate_size (`int`): SwiGLU hidden size.
        hidden_act (`str`): activation of the SwiGLU gate.
        norm_eps (`float`): RMSNorm epsilon.
        initializer_range (`float`): std of the normal init of linear and embedding weights.
        use_cache (`bool`): whether eval-mode forwards without `labels` return the recurrent state (and
            `generate`'s default); training forwards and forwards with `labels` build it only when asked.
        tie_word_embeddings (`bool`): share the input embedding with the LM head.
        attn_mode (`str`, *optional*): execution path of the RAM attention op; `None` lets it choose.
        num_cape_heads (`list[int]`, *optional*): per layer, how many heads (the first ones) use CAPE.
            `None` gives the paper's schedule in proportion to depth (see `default_num_cape_heads`); the resolved list is stored.
            Why a count here: the layers and the op take CAPE as `cape`, a bool per head
            (`RAMAttention(cape=...)`, `layer.cape`, `ram_attention(cape=...)`), but a model turns it
            on for the first heads of a layer, so its config needs only how many: layer i gets
            `cape = [h < num_cape_heads[i] for h in range(num_heads)]`. Configs saved before the rename
            call this field `cape_heads`, which is still accepted.
        mixer_types (`list[str]`, *optional*): the token mixer of each layer: `"ramnet"`
            (`RAMAttention`), `"hybrid"` (`HybridRAMAttention`: sliding-window softmax attention plus a
            fast-weight memory), `"full_attention"` or `"sliding_attention"` (`SlidingWindowAttention`:
            softmax attention with RoPE, `num_heads` heads of width `head_v_dim`). `None` makes every
            layer RAM-Net; the resolved list is stored. The read-only `layer_types` gives the same list
            in transformers' vocabulary, where RAM-Net is `"linear_attention"`; configs saved before
            the rename have that list under `layer_types`, which is still accepted.
        window_size (`int`): the window S of hybrid and sliding-attention layers (the chunk size of
            the delayed-chunk blend); 0 turns off the KV memory of a delayed-stream or synchronous
            hybrid.
        hybrid_blend (`str`): `"synchronous"`, `"delayed_stream"` or `"delayed_chunk"`.
        hybrid_mix (`str`): `"vector"` (per-channel sigmoid gate g, 1 - g), `"scalar"` (the paper's dynamic
            mix: two independent sigmoids per head from the input, one per memory) or `"sum"`.
        hybrid_fw (`str`): the fast-weight memory of hybrid layers, `"ramnet"` or `"deltanet"`.
        hybrid_deltanet_activation (`str`, *optional*): the feature map of a DeltaNet fast-weight
            memory: `"silu"` (the hybrid paper's DeltaNet: SiLU on q and k before their L2 norm, and
            on v) or `"identity"` (raw projections, what that memory computed before the SiLU was
            added). `None` resolves to `"silu"`, except in a config saved before this field existed
            (one that has `transformers_version` but not this field) whose hybrid layers are DeltaNet:
            that checkpoint was trained without the SiLU, so it gets `"identity"` and computes what it
            was trained to. The resolved value is stored.
        rope_theta (`float`): RoPE base of the softmax attention (hybrid and attention layers).
        short_conv_size (`int`): RAM-Net layers only: 0 (the paper's mixer), or the width of a causal
            depthwise convolution over time of the q, k and v projections (Gated DeltaNet uses 4).
        output_gate (`bool`): RAM-Net layers only: multiply the per-head RMS-normalised read by
            `silu(g_proj(x))` before the output projection, as Gated DeltaNet's gated output norm.
    """

    model_type = "ramnet"
    # Not a field: the old names that `__post_init__` moves to their new ones (`RENAMED_FIELDS`).
    renamed_fields: ClassVar[dict[str, str]] = RENAMED_FIELDS
    # transformers' standard names of fields that have another name here (read, set and passed to the
    # constructor under either; saved under ours), which its common model tests and helpers expect.
    attribute_map: ClassVar[dict[str, str]] = {"num_attention_heads": "num_heads"}
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 32000
    hidden_size: int = 1024
    num_hidden_layers: int = 27
    num_heads: int = 16
    head_v_dim: int = 64
    num_partitions: int = 5
    partition_dim: int = 4
    topk: int = 8
    # int accepted too, so that e.g. gamma=0 (a cumulative mean) can be written as such; a list is per head
    gamma: float | int | list[float | int] = 1.0
    tau: float | int = 1.0
    eps: float | int = 1e-6
    proxy_eps: float = DEFAULT_PROXY_EPS
    intermediate_size: int = 2816
    hidden_act: str = "silu"
    norm_eps: float = 1e-6
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = False
    attn_mode: str | None = None
    num_cape_heads: list[int] | None = None
    mixer_types: list[str] | None = None
    window_size: int = 64
    hybrid_blend: str = "synchronous"
    hybrid_mix: str = "vector"
    hybrid_fw: str = "ramnet"
    hybrid_deltanet_activation: str | None = None
    rope_theta: float | int = 10000.0
    short_conv_size: int = 0
    output_gate: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        self._take_renamed_fields(kwargs)
        self._take_standard_names(kwargs)
        if self.mixer_types is None:
            self.mixer_types = ["ramnet"] * self.num_hidden_layers
        if self.num_cape_heads is None:
            # RAM-Net layers only: a hybrid's fast-weight memory reads without positions, as in the
            # hybrid paper (its window branch has RoPE), and attention layers have no CAPE.
            schedule = default_num_cape_heads(self.num_hidden_layers, self.num_heads)
            self.num_cape_heads = [n if mixer == "ramnet" else 0 for n, mixer in zip(schedule, self.mixer_types)]
        self._resolve_hybrid_revision(kwargs)
        # Checked here rather than in a `validate_*` method so that a bad value raises a plain
        # ValueError that names the field (strict wraps class validators in its own error type).
        self._check_values()
        super().__post_init__(**kwargs)

    def _take_renamed_fields(self, kwargs: dict) -> None:
        """Move the fields of `kwargs` that have an old name (`RENAMED_FIELDS`) to their new one."""
        for old, new in RENAMED_FIELDS.items():
            if old not in kwargs:
                continue
            if getattr(self, new) is not None:
                raise ValueError(f"`{old}` is the old name of `{new}`: pass one of them, not both")
            value = kwargs.pop(old)
            if old == "layer_types" and value is not None:
                value = [MIXER_OF_LAYER_TYPE.get(kind, kind) for kind in value]
            setattr(self, new, value)

    def _take_standard_names(self, kwargs: dict) -> None:
        """Move the fields of `kwargs` under transformers' names (`attribute_map`) to ours, before the
        fields that depend on them (`num_cape_heads`) are resolved and checked."""
        for standard, field in self.attribute_map.items():
            if standard not in kwargs:
                continue
            value = kwargs.pop(standard)
            default = type(self).__dataclass_fields__[field].default
            if getattr(self, field) not in (default, value):
                raise ValueError(f"`{standard}` is transformers' name of `{field}`: pass one of them (or the same value)")
            setattr(self, field, value)

    def _resolve_hybrid_revision(self, kwargs: dict) -> None:
        """Fill in `hybrid_deltanet_activation` (see its entry in the class docstring). A config saved
        by `save_pretrained` or `to_dict` always has `transformers_version` and, since this field
        exists, the field itself; a saved config without it predates the hybrid layer's paper forms:
        the DeltaNet SiLU (such checkpoints load as "identity") and the input-dependent scalar mix
        (such checkpoints are refused: their weights have no equivalent the layer can load)."""
        if self.hybrid_deltanet_activation is not None:
            return
        saved = (getattr(self, "transformers_version", None) or kwargs.get("transformers_version")) is not None
        hybrid = "hybrid" in self.mixer_types
        if saved and hybrid and self.hybrid_mix == "scalar":
            raise ValueError(
                "This config was saved before the hybrid layers' scalar mix became input-dependent (the hybrid "
                "paper's): its checkpoint holds one static logit per head (`mix_logit`), which the layers no longer "
                "have; they compute sigmoid(mix_proj(x)) per head for each memory. Loading it would leave mix_proj "
                "freshly initialised. The old gate is exactly mix_proj.weight = 0, mix_proj.bias = "
                "[mix_logit, -mix_logit]: convert the weights so and add `hybrid_deltanet_activation` to config.json "
                "(its presence marks a config of the current form; \"identity\" for DeltaNet layers, as they were "
                "trained), or retrain"
            )
        if saved and hybrid and self.hybrid_fw == "deltanet":
            logger.warning(
                "This config was saved before `hybrid_deltanet_activation` existed: its DeltaNet hybrid layers "
                "were trained without the paper's SiLU feature map, so they keep computing that way "
                "(hybrid_deltanet_activation='identity')"
            )
            self.hybrid_deltanet_activation = "identity"
        else:
            self.hybrid_deltanet_activation = "silu"

    @property
    def layer_types(self) -> list[str]:
        """`mixer_types` in transformers' vocabulary (RAM-Net is `"linear_attention"`), read-only.

        Transformers reads `layer_types` (its config validator checks it, its mask and cache helpers
        and its context-parallel check consult it); this keeps what it sees as it was when the field
        itself had that name."""
        return [LAYER_TYPE_OF_MIXER.get(mixer, mixer) for mixer in self.mixer_types]

    @property
    def memory_slots(self) -> int:
        """Slots per head, `M = partition_dim ** num_partitions`."""
        return memory_geometry(self.num_partitions * self.partition_dim, self.num_partitions)[1]

    def _check_values(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_v_dim", "partition_dim",
                     "intermediate_size"):
            check_int(name, getattr(self, name), 1)
        # The op's rules (`ramnet.ops.checks`, which name the field), applied here too so that a bad
        # config fails when built.
        memory_geometry(self.num_partitions * self.partition_dim, self.num_partitions)
        check_topk(self.topk, self.memory_slots)
        self._check_gamma()
        check_positive("tau", self.tau)
        check_positive("eps", self.eps, allow_zero=True)
        check_positive("proxy_eps", self.proxy_eps, upper=1.0)
        check_choice("attn_mode", self.attn_mode, (None, *sorted(PATHS)))
        for name in ("norm_eps", "initializer_range", "rope_theta"):
            check_positive(name, getattr(self, name))
        if len(self.num_cape_heads) != self.num_hidden_layers:
            raise ValueError(
                f"`num_cape_heads` needs one entry per layer ({self.num_hidden_layers}), "
                f"got {len(self.num_cape_heads)}"
            )
        if not all(0 <= n <= self.num_heads for n in self.num_cape_heads):
            raise ValueError(
                f"`num_cape_heads` entries must be in [0, num_heads={self.num_heads}], got {self.num_cape_heads}"
            )
        self._check_mixer_types()
        self._check_ramnet_options()

    def _check_gamma(self):
        if not isinstance(self.gamma, list):
            check_positive("gamma", self.gamma, allow_zero=True)
            return
        if len(self.gamma) != self.num_heads:
            raise ValueError(f"`gamma` as a list needs one entry per head ({self.num_heads}), got {len(self.gamma)}")
        for value in self.gamma:
            check_positive("gamma entries", value, allow_zero=True)

    def _check_ramnet_options(self):
        if self.short_conv_size != 0:
            check_int("short_conv_size", self.short_conv_size, 2)  # 0 (off) or a kernel of >= 2 tokens
        if (self.short_conv_size or self.output_gate) and "ramnet" not in self.mixer_types:
            raise ValueError("`short_conv_size` and `output_gate` apply to RAM-Net layers, and `mixer_types` has none")

    def _check_mixer_types(self):
        if len(self.mixer_types) != self.num_hidden_layers:
            raise ValueError(
                f"`mixer_types` needs one entry per layer ({self.num_hidden_layers}), got {len(self.mixer_types)}"
            )
        if not set(self.mixer_types) <= set(MIXER_TYPES):
            raise ValueError(f"`mixer_types` entries must be in {list(MIXER_TYPES)}, got {self.mixer_types}")
        for name, allowed in (("hybrid_blend", BLENDS), ("hybrid_mix", MIXES), ("hybrid_fw", FAST_WEIGHTS),
                              ("hybrid_deltanet_activation", DELTANET_ACTIVATIONS)):
            check_choice(name, getattr(self, name), allowed)
        # Sliding attention and the delayed chunk need a window of at least one token; the other
        # blends accept 0 (no KV memory).
        needs_window = "sliding_attention" in self.mixer_types or (
            "hybrid" in self.mixer_types and self.hybrid_blend == "delayed_chunk"
        )
        minimum = 1 if needs_window else 0
        if self.window_size < minimum:
            raise ValueError(
                f"`window_size` must be >= {minimum} with mixer_types {sorted(set(self.mixer_types))} and "
                f"hybrid_blend {self.hybrid_blend!r}, got {self.window_size}"
            )


__all__ = ["LAYER_TYPE_OF_MIXER", "MIXER_TYPES", "RENAMED_FIELDS", "RAMNetConfig", "default_num_cape_heads"]
