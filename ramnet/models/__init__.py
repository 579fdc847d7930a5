"""Hugging Face models built on RAM attention. Importing this package registers them with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import RAMNetCache, RAMNetStaticCache
from .ramnet import RAMNetConfig, RAMNetForCausalLM, RAMNetModel, RAMNetPreTrainedModel

# exist_ok: re-importing (e.g. importlib.reload) must not fail on the already registered names.
AutoConfig.register(RAMNetConfig.model_type, RAMNetConfig, exist_ok=True)
AutoModel.register(RAMNetConfig, RAMNetModel, exist_ok=True)
AutoModelForCausalLM.register(RAMNetConfig, RAMNetForCausalLM, exist_ok=True)

__all__ = ["RAMNetCache", "RAMNetConfig", "RAMNetStaticCache", "RAMNetForCausalLM", "RAMNetModel", "RAMNetPreTrainedModel"]
