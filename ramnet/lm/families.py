"""The model families that `ramnet train` builds (`TrainConfig.model_type`): RAM-Net; Transformer++,
which is Hugging Face's Llama (RoPE, SwiGLU, RMSNorm, no biases, untied embeddings; fla and the RAM-Net
paper call it that); and, with flash-linear-attention installed (its kernels need a CUDA GPU), fla's
Gated DeltaNet, GLA, Mamba2, HGRN2 and Raven (top-k slot routing; fla 0.6.0 or later). `TrainConfig.model`
holds the keyword arguments of the family's config class. Every family is a `PreTrainedModel` that the Auto
classes load, so the trainer, checkpoints, `eval ppl`, `generate` and the lm-eval adapter treat them alike.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..models import RAMNetConfig

# model_type -> the name of the fla config class (in `fla.models`). `model_type` minus "fla." is the
# model_type that fla's checkpoints write to config.json.
FLA_CONFIGS = {"fla.gated_deltanet": "GatedDeltaNetConfig", "fla.gla": "GLAConfig", "fla.mamba2": "Mamba2Config",
               "fla.hgrn2": "HGRN2Config", "fla.raven": "RavenConfig"}
FLA_CHECKPOINT_TYPES = {name.removeprefix("fla.") for name in FLA_CONFIGS}
MODEL_TYPES = ("ramnet", "transformer++", *FLA_CONFIGS)  # TrainConfig.model_type


def import_fla(why: str):
    """`fla.models` (importing it registers fla's models with the Auto classes)."""
    try:
        import fla.models
    except ImportError as err:
        raise ValueError(
            f"{why} needs flash-linear-attention, which is not installed: pip install 'ramnet[baselines]' "
            f"(fla's kernels need a CUDA GPU) [{type(err).__name__}: {err}]"
        ) from err
    return fla.models


def config_class(model_type: str) -> type:
    if model_type == "ramnet":
        return RAMNetConfig
    if model_type == "transformer++":
        return LlamaConfig
    if model_type in FLA_CONFIGS:
        return getattr(import_fla(f"model_type={model_type!r}"), FLA_CONFIGS[model_type])
    raise ValueError(f"`model_type` must be one of {', '.join(MODEL_TYPES)}; got {model_type!r}")


def config_keys(cls: type) -> set[str]:
    """The keyword arguments that config class `cls` knows: its dataclass fields (transformers' own
    configs) and the named parameters of its `__init__` (configs that define one, as fla's do)."""
    keys = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    keys |= {p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind in named}
    # Old names a config still accepts (RAMNetConfig's RENAMED_FIELDS), so that older run configs load.
    keys |= set(getattr(cls, "renamed_fields", {}))
    return keys - {"self"}


def make_config(model_type: str, kwargs: dict):
    cls = config_class(model_type)
    # A config class keeps an unknown key as a plain attribute: a typo would go unnoticed.
    unknown = sorted(set(kwargs) - config_keys(cls))
    if unknown:
        raise ValueError(f"`model`: unknown {cls.__name__} key(s) {unknown} (model_type={model_type!r})")
    return cls(**kwargs)


def build(model_type: str, kwargs: dict):
    """A freshly initialised causal LM of the family (on the default device, from the global RNG)."""
    config = make_config(model_type, kwargs)
    extra = {"attn_implementation": "sdpa"} if model_type == "transformer++" else {}
    model = AutoModelForCausalLM.from_config(config, **extra)
    # Llama's and fla's embeddings take `padding_idx=pad_token_id`: that row starts at zero and never
    # learns. Nothing is padded in training, and the pad token is often the EOS/BOS that separates
    # every document (the BPE's <|endoftext|>), so it must learn like any other token (from its zero start).
    model.get_input_embeddings().padding_idx = None
    return model


def register_checkpoint(model_dir: str | Path) -> None:
    """Imports fla when the checkpoint in `model_dir` (a local directory) is one of its models, so that
    `AutoModelForCausalLM.from_pretrained` knows it. Without fla, only transformers' own Mamba2 loads."""
    file = Path(model_dir) / "config.json"
    if not file.is_file():
        return
    model_type = json.loads(file.read_text()).get("model_type")
    if model_type in FLA_CHECKPOINT_TYPES:
        try:
            import_fla(f"the checkpoint {model_dir} (model_type {model_type!r})")
        except ValueError:
            if model_type not in CONFIG_MAPPING:
                raise
