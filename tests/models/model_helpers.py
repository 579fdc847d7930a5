"""Tiny RAM-Net models shared by the model tests."""

import torch
from transformers.generation.streamers import BaseStreamer

from ramnet.models import RAMNetConfig, RAMNetForCausalLM

VOCAB = 97
TINY = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_heads=4, head_v_dim=8, num_partitions=3,
    partition_dim=3, topk=4, intermediate_size=48,
    num_cape_heads=[4, 2, 0],  # all, some and no CAPE heads
    pad_token_id=0, bos_token_id=None, eos_token_id=None,  # generation always runs for max_new_tokens
)


def tiny_config(**overrides) -> RAMNetConfig:
    return RAMNetConfig(**(TINY | overrides))


def tiny_model(dtype=torch.float64, **overrides) -> RAMNetForCausalLM:
    # fp64 so that cached and uncached paths agree far below the gaps between logits
    torch.manual_seed(0)
    return RAMNetForCausalLM(tiny_config(**overrides)).to(dtype).eval()


def random_ids(batch, length, seed=1):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


class Collect(BaseStreamer):
    """A streamer that keeps what `generate` hands it: each `put`'s tokens as a list, then \"end\"."""

    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.tolist())

    def end(self):
        self.chunks.append("end")
