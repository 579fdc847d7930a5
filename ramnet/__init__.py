"""RAM-Net: linear attention whose keys and queries are decoded into K-hot addresses over a memory
of M = d_p ** U slots; each token reads and writes only K of them.

``import ramnet`` registers the model with transformers' Auto classes.
"""

__version__ = "0.1.0"

from . import layers, models, ops  # noqa: E402  (models registers the Auto classes)
from .accounting import state_size  # noqa: E402
from .layers import RAMAttention  # noqa: E402
from .models import RAMNetConfig, RAMNetForCausalLM, RAMNetModel  # noqa: E402
from .ops import RAMState, address_decode, ram_attention  # noqa: E402

__all__ = [
    "__version__",
    "address_decode",
    "ram_attention",
    "RAMState",
    "RAMAttention",
    "RAMNetConfig",
    "RAMNetModel",
    "RAMNetForCausalLM",
    "state_size",
    "layers",
    "models",
    "ops",
]
