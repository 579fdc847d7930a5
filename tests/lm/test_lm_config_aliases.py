"""Run configs written before the RAMNetConfig renames (cape_heads, layer_types) still build their model."""

from ramnet.lm.config import load_config
from ramnet.lm.families import build


def test_old_model_keys_of_a_run_config_still_build_the_same_model():
    old = load_config("tiny", None, ["model.cape_heads=[1,0,0,0]",
                                     "model.layer_types=[linear_attention,linear_attention,sliding_attention,linear_attention]"])
    new = load_config("tiny", None, ["model.num_cape_heads=[1,0,0,0]",
                                     "model.mixer_types=[ramnet,ramnet,sliding_attention,ramnet]"])
    old_model, new_model = build(old.model_type, old.model), build(new.model_type, new.model)
    assert old_model.config.num_cape_heads == new_model.config.num_cape_heads == [1, 0, 0, 0]
    assert old_model.config.mixer_types == new_model.config.mixer_types == ["ramnet", "ramnet", "sliding_attention", "ramnet"]
