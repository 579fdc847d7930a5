"""RAM-Net model configuration."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ...layers.hybrid import BLENDS, FAST_WEIGHTS, MIXES
from ...ops.checks import check_choice, check_int, check_positive, check_topk, memory_geometry
from ...ops.ram import PATHS
from ...ops.ram.spec import DEFAULT_PROXY_EPS

# Transformers' own names (its config validator accepts no others for `layer_types`).
LAYER_TYPES = ("linear_attention", "hybrid", "full_attention", "sliding_attention")


def default_cape_heads(num_hidden_layers: int, num_heads: int) -> list[int]:
    """The paper's LM schedule: CAPE on all heads of layers 1-4, on half of them in layers 5-8,
    absolute addressing after that."""
    return [num_heads if i < 4 else num_heads // 2 if i < 8 else 0 for i in range(num_hidden_layers)]


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
        gamma (`float`): PDMA decay power (0 keeps everything, 1 is an EMA).
        tau (`float`): softmax temperature of the address decoder.
        eps (`float`): added to the PDMA normaliser before the read division.
        proxy_eps (`float`): smoothing of the proxy gradient of the decay.
        intermediate_size (`int`): SwiGLU hidden size.
        hidden_act (`str`): activation of the SwiGLU gate.
        norm_eps (`float`): RMSNorm epsilon.
        initializer_range (`float`): std of the normal init of linear and embedding weights.
        use_cache (`bool`): whether eval-mode forwards return the recurrent state.
        tie_word_embeddings (`bool`): share the input embedding with the LM head.
        attn_mode (`str`, *optional*): execution path of the RAM attention op; `None` lets it choose.
        cape_heads (`list[int]`, *optional*): per layer, how many heads (the first ones) use CAPE.
            `None` gives the paper's schedule (see `default_cape_heads`); the resolved list is stored.
        layer_types (`list[str]`, *optional*): the token mixer of each layer: `"linear_attention"`
            (RAM-Net), `"hybrid"` (`HybridRAMAttention`: sliding-window softmax attention plus a
            fast-weight memory), `"full_attention"` or `"sliding_attention"` (softmax attention with
            RoPE, `num_heads` heads of width `head_v_dim`). `None` makes every layer RAM-Net; the
            resolved list is stored.
        window_size (`int`): the window S of hybrid and sliding-attention layers (the chunk size of
            the delayed-chunk blend); 0 turns off the KV memory of a delayed-stream or synchronous
            hybrid.
        hybrid_blend (`str`): `"synchronous"`, `"delayed_stream"` or `"delayed_chunk"`.
        hybrid_mix (`str`): `"vector"` (per-channel sigmoid gate), `"scalar"` (per head) or `"sum"`.
        hybrid_fw (`str`): the fast-weight memory of hybrid layers, `"ramnet"` or `"deltanet"`.
        rope_theta (`float`): RoPE base of the softmax attention (hybrid and attention layers).
    """

    model_type = "ramnet"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 32000
    hidden_size: int = 1024
    num_hidden_layers: int = 27
    num_heads: int = 16
    head_v_dim: int = 64
    num_partitions: int = 5
    partition_dim: int = 4
    topk: int = 8
    # int accepted too, so that e.g. gamma=0 (a cumulative mean) can be written as such
    gamma: float | int = 1.0
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
    cape_heads: list[int] | None = None
    layer_types: list[str] | None = None
    window_size: int = 64
    hybrid_blend: str = "synchronous"
    hybrid_mix: str = "vector"
    hybrid_fw: str = "ramnet"
    rope_theta: float | int = 10000.0
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        if self.cape_heads is None:
            self.cape_heads = default_cape_heads(self.num_hidden_layers, self.num_heads)
        if self.layer_types is None:
            self.layer_types = ["linear_attention"] * self.num_hidden_layers
        # Checked here rather than in a `validate_*` method so that a bad value raises a plain
        # ValueError that names the field (strict wraps class validators in its own error type).
        self._check_values()
        super().__post_init__(**kwargs)

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
        check_positive("gamma", self.gamma, allow_zero=True)
        check_positive("tau", self.tau)
        check_positive("eps", self.eps, allow_zero=True)
        check_positive("proxy_eps", self.proxy_eps, upper=1.0)
        check_choice("attn_mode", self.attn_mode, (None, *sorted(PATHS)))
        for name in ("norm_eps", "initializer_range", "rope_theta"):
            check_positive(name, getattr(self, name))
        if len(self.cape_heads) != self.num_hidden_layers:
            raise ValueError(
                f"`cape_heads` needs one entry per layer ({self.num_hidden_layers}), got {len(self.cape_heads)}"
            )
        if not all(0 <= n <= self.num_heads for n in self.cape_heads):
            raise ValueError(f"`cape_heads` entries must be in [0, num_heads={self.num_heads}], got {self.cape_heads}")
        self._check_layer_types()

    def _check_layer_types(self):
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"`layer_types` needs one entry per layer ({self.num_hidden_layers}), got {len(self.layer_types)}"
            )
        if not set(self.layer_types) <= set(LAYER_TYPES):
            raise ValueError(f"`layer_types` entries must be in {list(LAYER_TYPES)}, got {self.layer_types}")
        for name, allowed in (("hybrid_blend", BLENDS), ("hybrid_mix", MIXES), ("hybrid_fw", FAST_WEIGHTS)):
            check_choice(name, getattr(self, name), allowed)
        # Sliding attention and the delayed chunk need a window of at least one token; the other
        # blends accept 0 (no KV memory).
        needs_window = "sliding_attention" in self.layer_types or (
            "hybrid" in self.layer_types and self.hybrid_blend == "delayed_chunk"
        )
        minimum = 1 if needs_window else 0
        if self.window_size < minimum:
            raise ValueError(
                f"`window_size` must be >= {minimum} with layer_types {sorted(set(self.layer_types))} and "
                f"hybrid_blend {self.hybrid_blend!r}, got {self.window_size}"
            )


__all__ = ["LAYER_TYPES", "RAMNetConfig", "default_cape_heads"]
