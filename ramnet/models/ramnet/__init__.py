from .configuration_ramnet import RAMNetConfig, default_num_cape_heads, paper_num_cape_heads
from .modeling_ramnet import RAMNetForCausalLM, RAMNetModel, RAMNetPreTrainedModel

__all__ = ["RAMNetConfig", "RAMNetForCausalLM", "RAMNetModel", "RAMNetPreTrainedModel", "default_num_cape_heads",
           "paper_num_cape_heads"]
