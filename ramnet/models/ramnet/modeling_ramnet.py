"""RAM-Net language model in the Hugging Face layout (`RAMNetModel`, `RAMNetForCausalLM`)."""

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import can_return_tuple, logging
from transformers.utils.output_capturing import capture_outputs

from ...layers import HybridRAMAttention, RAMAttention, SlidingWindowAttention
from ...layers.padding import real_tokens
from ...layers.ram_attention import RAMProjections
from ...layers.short_conv import ShortConvolution
from ..cache import RAMNetCache, RAMNetStaticCache, static_cache_supported
from . import decode_loop
from .configuration_ramnet import RAMNetConfig


logger = logging.get_logger(__name__)

# The initial gain of a hybrid layer's per-head output RMSNorm (`HybridRAMAttention.o_norm`). The norm
# makes every head's mix unit-RMS however little the memories hold, so at gain 1 the hybrid's mixer
# starts much louder than RAM-Net's, whose un-normalised read averages values from projections of
# std initializer_range. The LM issue's CPU tiny run: loss 5.48 at gain 1, 4.91 at 0.02 (RAM-Net alone
# 4.95). Small rather than zero: at zero no gradient would reach anything before the norm (the
# projections, the memories, the mix) until the gain itself had moved.
HYBRID_O_NORM_INIT_GAIN = 0.02

# Whether `generate` on CUDA takes the static cache and its graph-captured step without being asked
# (`cache_implementation="static"`). On since tests/models/test_generation_cuda.py passed on an H200
# (torch 2.11, Triton 3.6, 2026-12-02): the graph loop's tokens are the eager loop's and the full
# forward's. Set it to False to decode eagerly by default (or pass cache_implementation="dynamic").
STATIC_CACHE_BY_DEFAULT_ON_CUDA = True

# transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache` (the
# old name still works there, with a warning); 5.17, the GPU image's, knows only the old name.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _one_cache(past_key_values: RAMNetCache | None, cache: RAMNetCache | None) -> RAMNetCache | None:
    """The cache, under whichever name the caller (a user, or `generate` of either release) used."""
    if past_key_values is not None and cache is not None:
        raise ValueError("Pass the cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


class RAMNetMLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x))."""

    def __init__(self, config: RAMNetConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def token_mixer(config: RAMNetConfig, layer_idx: int) -> nn.Module:
    """The token mixer that `config.mixer_types[layer_idx]` names."""
    mixer_type = config.mixer_types[layer_idx]
    if mixer_type in ("full_attention", "sliding_attention"):
        return SlidingWindowAttention(
            hidden_size=config.hidden_size,
            num_heads=config.num_heads,
            head_dim=config.head_v_dim,
            window_size=config.window_size if mixer_type == "sliding_attention" else None,
            rope_theta=config.rope_theta,
            layer_idx=layer_idx,
        )
    num_cape = config.num_cape_heads[layer_idx]
    ram = dict(
        hidden_size=config.hidden_size,
        num_heads=config.num_heads,
        head_v_dim=config.head_v_dim,
        num_partitions=config.num_partitions,
        partition_dim=config.partition_dim,
        topk=config.topk,
        gamma=config.gamma,
        tau=config.tau,
        eps=config.eps,
        proxy_eps=config.proxy_eps,
        cape=[head < num_cape for head in range(config.num_heads)],
        mode=config.attn_mode,
        layer_idx=layer_idx,
    )
    if mixer_type == "ramnet":
        return RAMAttention(**ram, short_conv_size=config.short_conv_size, output_gate=config.output_gate,
                            norm_eps=config.norm_eps)
    return HybridRAMAttention(
        **ram,
        window_size=config.window_size,
        blend=config.hybrid_blend,
        mix=config.hybrid_mix,
        fast_weight=config.hybrid_fw,
        deltanet_activation=config.hybrid_deltanet_activation,
        rope_theta=config.rope_theta,
        norm_eps=config.norm_eps,
    )


class RAMNetDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + mixer(norm(x)), then x + MLP(norm(x)); the mixer is RAM attention, a
    hybrid or softmax attention, as `config.mixer_types` says."""

    def __init__(self, config: RAMNetConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = token_mixer(config, layer_idx)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = RAMNetMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: RAMNetCache | None = None,
        use_cache: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        attn_out, _, _ = self.attn(
            self.attn_norm(hidden_states),
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class RAMNetPreTrainedModel(PreTrainedModel):
    config: RAMNetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RAMNetDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    # The state cannot be rolled back, so assisted/speculative decoding is refused up front.
    _is_stateful = True
    _can_record_outputs = {"hidden_states": RAMNetDecoderLayer}

    @torch.no_grad()
    def _init_weights(self, module):
        # Linear/Embedding: normal(0, initializer_range), biases zero; RMSNorm weights one (but below).
        super()._init_weights(module)
        if isinstance(module, RAMProjections):  # RAMAttention and HybridRAMAttention
            # e^0 = 1: the learnable per-head q/k temperatures start neutral.
            init.zeros_(module.q_log_scale)
            init.zeros_(module.k_log_scale)
        if isinstance(module, HybridRAMAttention):
            # Children are initialised first, so this overrides o_norm's ones; a loaded gain is kept.
            init.constant_(module.o_norm.weight, HYBRID_O_NORM_INIT_GAIN)
        if isinstance(module, ShortConvolution):  # starts as the identity (init.copy_ keeps loaded weights)
            init.copy_(module.weight, module.identity_weight())


class RAMNetModel(RAMNetPreTrainedModel):
    def __init__(self, config: RAMNetConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(RAMNetDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: RAMNetCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache: RAMNetCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`attention_mask` is `[batch, past + new tokens]`, 1 for real tokens and 0 for padding (left
        padding or anywhere); padded tokens are skipped by every memory and get no position. `cache`
        (or `past_key_values`, its name before transformers 5.24) is a `RAMNetCache` holding the
        states and key/value windows after the earlier tokens."""
        past_key_values = _one_cache(past_key_values, cache)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if past_key_values is not None and not isinstance(past_key_values, RAMNetCache):
            raise TypeError(
                f"RAM-Net layers keep recurrent states and their own key/value windows: pass a RAMNetCache, got "
                f"{type(past_key_values).__name__}"
            )

        # Training forwards do not build the final state unless asked: it is M * d_v per head and sequence.
        # (`generate` asks: it passes its generation config's use_cache.)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and self.gradient_checkpointing and self.training:
            logger.warning_once("`use_cache=True` is incompatible with gradient checkpointing. Setting `use_cache=False`.")
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = RAMNetCache()

        # The ids of a one-token step with a cache are not checked: that is generate's decoding step, whose
        # token the model itself sampled, and the check would read the device (prepare_inputs_for_generation
        # checks the prompt).
        decoding = past_key_values is not None and input_ids is not None and input_ids.dim() == 2 and input_ids.shape[1] == 1
        hidden_states = self._embed(input_ids, inputs_embeds, check_ids=not decoding)
        if real_tokens(attention_mask, *hidden_states.shape[:2]) is None:  # the mask checked, once
            attention_mask = None  # no padding among the new tokens: spare every layer the check
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states), **{CACHE_FIELD: past_key_values if use_cache else None}
        )

    def _embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
               check_ids: bool = True) -> torch.Tensor:
        """The input embeddings ``[B, T, hidden_size]``, from ``input_ids`` (checked against the
        vocabulary unless ``check_ids`` is False) or ``inputs_embeds`` (checked for its shape); at least
        one token."""
        if inputs_embeds is not None:
            if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 or (
                    inputs_embeds.shape[-1] != self.config.hidden_size):
                shape = tuple(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor) else inputs_embeds
                raise ValueError(f"inputs_embeds must be [B, T, hidden_size={self.config.hidden_size}], got {shape}")
            tokens = inputs_embeds
        else:
            if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
                shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
                raise ValueError(f"input_ids must be an integer tensor [B, T], got {shape}")
            tokens = input_ids
        if tokens.shape[1] == 0:
            what = "input_ids" if inputs_embeds is None else "inputs_embeds"
            raise ValueError(f"{what} must hold at least one token (T >= 1), got shape {tuple(tokens.shape)}; "
                             "a prompt to generate from needs one too")
        if inputs_embeds is not None:
            return inputs_embeds
        if check_ids:
            check_token_ids(input_ids, self.config.vocab_size)
        return self.embed_tokens(input_ids)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """``input_ids`` in ``[0, vocab_size)``, else a ValueError naming an id outside (one read of the device)."""
    outside = (input_ids < 0) | (input_ids >= vocab_size)
    if bool(outside.any()):
        raise ValueError(f"input_ids must be in [0, vocab_size={vocab_size}), got the id {input_ids[outside][0].item()}")


class RAMNetForCausalLM(RAMNetPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RAMNetConfig):
        super().__init__(config)
        self.model = RAMNetModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # `generate` would otherwise pre-build a key/value DynamicCache; returning False leaves the
        # cache to the first forward, which creates a RAMNetCache (as with use_cache outside generate).
        return False

    def _prepare_model_inputs(self, *args, **kwargs):
        # `generate`'s first look at the prompt (transformers' hook, in every release we run on): an empty
        # one is refused here, before transformers' right-padding check indexes its last token.
        inputs, input_name, model_kwargs = super()._prepare_model_inputs(*args, **kwargs)
        if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 and inputs.shape[1] == 0:
            raise ValueError(f"generate needs a prompt of at least one token, got {input_name} of shape "
                             f"{tuple(inputs.shape)}")
        return inputs, input_name, model_kwargs

    def new_cache(self, cache_implementation: str | None = None) -> RAMNetCache:
        """The cache `generate` decodes with. `"static"`: a `RAMNetStaticCache` (fixed buffers, RAM layers
        only), with which `generate` captures each decoding step on CUDA in a CUDA graph (its
        auto-compilation of a model with an `is_compileable` cache); `"dynamic"`: a `RAMNetCache`; None
        (the default): static on CUDA when every mixer is a RAM layer (`STATIC_CACHE_BY_DEFAULT_ON_CUDA`),
        else dynamic."""
        if cache_implementation not in (None, "static", "dynamic"):
            raise ValueError(f"cache_implementation must be None, 'static' or 'dynamic' for RAM-Net, got "
                             f"{cache_implementation!r}")
        if cache_implementation is None:
            static = (STATIC_CACHE_BY_DEFAULT_ON_CUDA and self.device.type == "cuda"
                      and static_cache_supported(self.config))
            cache_implementation = "static" if static else "dynamic"
        return RAMNetStaticCache(self.config) if cache_implementation == "static" else RAMNetCache()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # transformers builds its own caches here (a StaticCache of keys and values for "static"); RAM-Net
        # provides its own, under the cache argument's name in this transformers release.
        implementation = generation_config.cache_implementation
        if (model_kwargs.get(CACHE_FIELD) is None and generation_config.use_cache is not False
                and implementation in (None, "static", "dynamic")):
            model_kwargs[CACHE_FIELD] = self.new_cache(implementation)
            return
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, inputs_embeds=None,
                                      is_first_iteration: bool | None = False, **kwargs):
        # inputs_embeds named: generate looks for it in this signature before it accepts inputs_embeds.
        inputs = super().prepare_inputs_for_generation(input_ids, next_sequence_length=next_sequence_length,
                                                       inputs_embeds=inputs_embeds,
                                                       is_first_iteration=is_first_iteration, **kwargs)
        ids = inputs.get("input_ids")
        if is_first_iteration and isinstance(ids, torch.Tensor) and ids.dim() == 2:
            check_token_ids(ids, self.config.vocab_size)  # the prompt (the model skips a one-token step's)
        if not is_first_iteration and ids is not None and ids.shape[1] == 1:
            # A decoding step feeds the token generate just chose: always a real token, so the padding
            # mask has nothing to say about it (a left-padded prompt's padding is in the cached state's
            # positions already). Dropped, the step does not read the mask on the host.
            inputs["attention_mask"] = None
        return inputs

    def clear_decode_graphs(self) -> int:
        """Drops the decode loops `generate` keeps between calls (`decode_loop.py`: per batch size, sampler
        settings, stop tokens, output length bucket: buffers, a copy of the cache's state, and on CUDA the
        captured graph with its memory pool); the next call builds and captures anew. Returns how many
        there were. Moving the model (`to`, `cuda`, `half`, ...) drops them too."""
        return decode_loop.clear_loops(self)

    def _apply(self, fn, *args, **kwargs):
        # A move to another device or dtype makes new weights: graphs captured on the old ones are stale
        # (their key would not match again anyway), and their memory is better given back now.
        decode_loop.clear_loops(self)
        return super()._apply(fn, *args, **kwargs)

    def generate(self, *args, ramnet_decode_loop: bool | str | None = None, **kwargs):
        """transformers' `generate`; greedy search and sampling with the static cache take RAM-Net's decode
        loop (`decode_loop.py`: one whole step captured in a CUDA graph on CUDA) where it gives the same
        result. `ramnet_decode_loop`: None (the default, `decode_loop.DECODE_LOOP_BY_DEFAULT`; on CUDA also
        `decode_loop.BY_DEFAULT_ON_CUDA`), False
        (transformers' loop), "eager" (the loop without the graph), True or "graph", or "compiled" (the model's
        step through `torch.compile`, then as "graph")."""
        if ramnet_decode_loop not in decode_loop.CHOICES:
            raise ValueError(f"ramnet_decode_loop must be one of {decode_loop.CHOICES}, got {ramnet_decode_loop!r}")
        # `_sample` reads it: transformers' generate would refuse an argument it does not know.
        self._ramnet_decode_loop_choice = ramnet_decode_loop
        for name in ("cache", "past_key_values"):  # a cache the caller keeps (as transformers 5.25 marks it)
            if isinstance(kwargs.get(name), RAMNetCache):
                kwargs[name]._is_user_defined = True
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._ramnet_decode_loop_choice = None

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                streamer=None, **model_kwargs):
        # transformers' greedy search and sampling (what `generate` calls for num_beams == 1), after it has
        # prepared everything: the config, stop and pad tokens, the mask, the cache, the processors.
        choice = getattr(self, "_ramnet_decode_loop_choice", None)
        if choice is None:
            choice = getattr(generation_config, "ramnet_decode_loop", None)
        choice = decode_loop.default_choice(choice, input_ids.device)
        if not decode_loop.fast_path_applies(choice, logits_processor, stopping_criteria, generation_config,
                                             synced_gpus, model_kwargs, CACHE_FIELD):
            return super()._sample(input_ids, logits_processor, stopping_criteria, generation_config,
                                   synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
        sequences, cache = decode_loop.decode(self, input_ids, logits_processor, stopping_criteria, generation_config,
                                              streamer, model_kwargs, CACHE_FIELD, choice)
        if generation_config.return_dict_in_generate:
            return GenerateDecoderOnlyOutput(sequences=sequences, **{CACHE_FIELD: cache})
        return sequences

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        # With an `is_compileable` cache, generate turns the 2-D padding mask into 4-D attention masks
        # (for key/value caches) through this method; RAM-Net's layers take the 2-D mask itself.
        return attention_mask

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: RAMNetCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: RAMNetCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`labels` are the input ids themselves (shifted inside the loss), -100 where ignored.
        `logits_to_keep` computes logits only for the last positions (an int) or the given ones.
        A forward with `labels` scores: it builds no cache unless `use_cache=True` asks for one."""
        if use_cache is None and labels is not None:
            use_cache = False
        if isinstance(logits_to_keep, bool) or isinstance(logits_to_keep, int) and logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0: every position) or a tensor of positions, got "
                             f"{logits_to_keep!r}")
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=_one_cache(past_key_values, cache),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)}
        )


__all__ = ["RAMNetForCausalLM", "RAMNetModel", "RAMNetPreTrainedModel"]
