"""RAMNetConfig answers to transformers' standard names (issue 15, item 8): `attribute_map` maps
`num_attention_heads` to `num_heads`, as transformers' ConfigTester common properties expect (get,
set, and pass to the constructor)."""

import pytest

from ramnet.models import RAMNetConfig, RAMNetForCausalLM

from model_helpers import tiny_config


def test_common_properties_get_set_and_construct():
    config = tiny_config()
    for name in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        assert hasattr(config, name), name
    assert config.num_attention_heads == config.num_heads == 4
    config.num_attention_heads = 2
    assert config.num_heads == 2 and config.num_attention_heads == 2
    for value in (1, 3):
        built = RAMNetConfig(num_attention_heads=value, num_hidden_layers=2)
        assert built.num_heads == value and built.num_attention_heads == value
        assert all(n <= value for n in built.num_cape_heads)  # the schedule is resolved for these heads


def test_saved_under_our_name_and_loaded_back(tmp_path):
    config = RAMNetConfig(num_attention_heads=2, num_hidden_layers=1, hidden_size=16, head_v_dim=4,
                          num_partitions=2, partition_dim=2, topk=2, intermediate_size=16, vocab_size=11)
    assert "num_attention_heads" not in config.to_dict() and config.to_dict()["num_heads"] == 2
    RAMNetForCausalLM(config).save_pretrained(tmp_path)
    loaded = RAMNetForCausalLM.from_pretrained(tmp_path).config
    assert loaded.num_heads == 2 and loaded.num_attention_heads == 2


def test_both_names_with_different_values_are_refused():
    with pytest.raises(ValueError, match="`num_attention_heads` is transformers' name of `num_heads`"):
        RAMNetConfig(num_heads=2, num_attention_heads=4)
    assert RAMNetConfig(num_heads=4, num_attention_heads=4, num_hidden_layers=1).num_heads == 4
