"""Checkpoints saved before issue 14 renamed config fields still load (`RENAMED_FIELDS`)."""

import json

import pytest
import torch

from ramnet.layers import HybridRAMAttention, RAMAttention, SlidingWindowAttention
from ramnet.models import RAMNetConfig, RAMNetForCausalLM

from model_helpers import random_ids, tiny_model

# config.json as RAMNetConfig wrote it before the renames (transformers 5.24), word for word.
OLD_CONFIG = {
    "attn_mode": None,
    "bos_token_id": None,
    "cape_heads": [4, 2, 0, 2],
    "eos_token_id": None,
    "eps": 1e-06,
    "gamma": 1.0,
    "head_v_dim": 8,
    "hidden_act": "silu",
    "hidden_size": 32,
    "hybrid_blend": "synchronous",
    "hybrid_fw": "ramnet",
    "hybrid_mix": "vector",
    "initializer_range": 0.02,
    "intermediate_size": 48,
    "layer_types": ["hybrid", "sliding_attention", "full_attention", "linear_attention"],
    "model_type": "ramnet",
    "norm_eps": 1e-06,
    "num_heads": 4,
    "num_hidden_layers": 4,
    "num_partitions": 3,
    "pad_token_id": 0,
    "partition_dim": 3,
    "proxy_eps": 0.01,
    "rope_theta": 10000.0,
    "tau": 1.0,
    "tie_word_embeddings": False,
    "topk": 4,
    "transformers_version": "5.24.0",
    "use_cache": True,
    "vocab_size": 97,
    "window_size": 3,
}
# The same model under today's names.
NEW_NAMES = dict(
    num_hidden_layers=4, num_cape_heads=[4, 2, 0, 2],
    mixer_types=["hybrid", "sliding_attention", "full_attention", "ramnet"], window_size=3,
)


def test_a_checkpoint_saved_before_the_renames_loads(tmp_path):
    model = tiny_model(torch.float32, **NEW_NAMES)
    ids = random_ids(2, 7)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "old")
    (tmp_path / "old" / "config.json").write_text(json.dumps(OLD_CONFIG))

    loaded = RAMNetForCausalLM.from_pretrained(tmp_path / "old").eval()
    assert loaded.config.num_cape_heads == [4, 2, 0, 2]
    assert loaded.config.mixer_types == NEW_NAMES["mixer_types"]
    assert loaded.config.layer_types == OLD_CONFIG["layer_types"]  # transformers' view, as before
    mixers = [layer.attn for layer in loaded.model.layers]
    attention = SlidingWindowAttention
    assert [type(m) for m in mixers] == [HybridRAMAttention, attention, attention, RAMAttention]
    assert mixers[0].cape == (True,) * 4 and mixers[3].cape == (True, True, False, False)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)

    loaded.config.save_pretrained(tmp_path / "new")  # saved again: under the new names only
    saved = json.loads((tmp_path / "new" / "config.json").read_text())
    assert saved["num_cape_heads"] == [4, 2, 0, 2] and "cape_heads" not in saved
    assert saved["mixer_types"] == NEW_NAMES["mixer_types"] and "layer_types" not in saved


def test_old_and_new_name_together_are_refused():
    with pytest.raises(ValueError, match="`cape_heads` is the old name of `num_cape_heads`"):
        RAMNetConfig(num_hidden_layers=2, num_heads=4, cape_heads=[1, 0], num_cape_heads=[1, 0])
    with pytest.raises(ValueError, match="`layer_types` is the old name of `mixer_types`"):
        RAMNetConfig(num_hidden_layers=1, layer_types=["linear_attention"], mixer_types=["ramnet"])


def test_layer_types_speaks_transformers_vocabulary():
    # transformers (5.2x) checks `layer_types` against its own names when a config is built; RAM-Net
    # layers are its linear attention
    config = RAMNetConfig(num_hidden_layers=4, window_size=3, mixer_types=NEW_NAMES["mixer_types"])
    assert config.layer_types == ["hybrid", "sliding_attention", "full_attention", "linear_attention"]
