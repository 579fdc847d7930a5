"""Without a GPU, Triton kernels run on CPU tensors under Triton's interpreter, which has to be
switched on before triton is first imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
