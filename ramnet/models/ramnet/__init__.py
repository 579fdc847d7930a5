from .configuration_ramnet import RAMNetConfig, default_cape_heads
from .modeling_ramnet import RAMNetForCausalLM, RAMNetModel, RAMNetPreTrainedModel

__all__ = ["RAMNetConfig", "RAMNetForCausalLM", "RAMNetModel", "RAMNetPreTrainedModel", "default_cape_heads"]
