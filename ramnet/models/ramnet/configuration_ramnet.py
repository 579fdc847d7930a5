"""RAM-Net model configuration."""

import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ...ops.ram_attention import PATHS


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
    """

    model_type = "ramnet"
    keys_to_ignore_at_inference = ["past_key_values"]

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
    proxy_eps: float = 1e-2
    intermediate_size: int = 2816
    hidden_act: str = "silu"
    norm_eps: float = 1e-6
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = False
    attn_mode: str | None = None
    cape_heads: list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        if self.cape_heads is None:
            self.cape_heads = default_cape_heads(self.num_hidden_layers, self.num_heads)
        # Checked here rather than in a `validate_*` method so that a bad value raises a plain
        # ValueError that names the field (strict wraps class validators in its own error type).
        self._check_values()
        super().__post_init__(**kwargs)

    @property
    def memory_slots(self) -> int:
        """Slots per head, `M = partition_dim ** num_partitions`."""
        return self.partition_dim**self.num_partitions

    def _check_values(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_heads",
            "head_v_dim",
            "num_partitions",
            "partition_dim",
            "topk",
            "intermediate_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive int, got {getattr(self, name)}")
        if self.topk > self.memory_slots:
            raise ValueError(
                f"`topk` ({self.topk}) must not exceed the memory slots partition_dim ** num_partitions "
                f"({self.memory_slots})"
            )
        # The op's ranges, checked here too so that a bad config fails when built.
        ranges = {
            "gamma": (lambda x: x >= 0, ">= 0"),
            "tau": (lambda x: x > 0, "> 0"),
            "eps": (lambda x: x >= 0, ">= 0"),
            "proxy_eps": (lambda x: 0 < x <= 1, "in (0, 1]"),
            "norm_eps": (lambda x: x > 0, "> 0"),
            "initializer_range": (lambda x: x > 0, "> 0"),
        }
        for name, (ok, bound) in ranges.items():
            value = getattr(self, name)
            if not (math.isfinite(value) and ok(value)):
                raise ValueError(f"`{name}` must be finite and {bound}, got {value}")
        if self.attn_mode is not None and self.attn_mode not in PATHS:
            raise ValueError(f"`attn_mode` must be None or one of {sorted(PATHS)}, got {self.attn_mode!r}")
        if len(self.cape_heads) != self.num_hidden_layers:
            raise ValueError(
                f"`cape_heads` needs one entry per layer ({self.num_hidden_layers}), got {len(self.cape_heads)}"
            )
        if not all(0 <= n <= self.num_heads for n in self.cape_heads):
            raise ValueError(f"`cape_heads` entries must be in [0, num_heads={self.num_heads}], got {self.cape_heads}")


__all__ = ["RAMNetConfig", "default_cape_heads"]
