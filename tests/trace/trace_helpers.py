"""A tiny RAM-Net checkpoint with a tokenizer, made in seconds: random weights saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch
from pydoc_data.topics import topics

from ramnet.lm.tokenizer import train_bpe
from ramnet.models import RAMNetConfig, RAMNetForCausalLM

# The `tiny` preset's shape (ramnet.lm.config.TINY_MODELS["ramnet"]): M = 4**3 = 64 slots, K = 4, with CAPE
# on half the heads of the first layer.
TINY_SHAPE = dict(hidden_size=128, num_hidden_layers=4, num_heads=4, head_v_dim=32, num_partitions=3, partition_dim=4,
                  topk=4, intermediate_size=352)


def text(n_docs: int = 6) -> str:
    return "\n\n".join(topics[k] for k in sorted(topics)[:n_docs])


def tiny_checkpoint(path: Path, **overrides) -> Path:
    tok = train_bpe([text(20)], vocab_size=300)
    config = RAMNetConfig(**(TINY_SHAPE | dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                               eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                                               num_cape_heads=[2, 0, 0, 0]) | overrides))
    torch.manual_seed(0)
    model = RAMNetForCausalLM(config).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
