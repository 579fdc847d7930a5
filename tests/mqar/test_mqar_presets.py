"""MQARPreset: validation at construction and the JSON form that --dump-config and --config share."""

import copy
import json

import pytest

from ramnet.cli import main
from ramnet.mqar.presets import PRESETS, MQARPreset, as_preset, describe_cuts, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dump_config_is_a_file_that_config_accepts(name, tmp_path, capsys):
    assert main(["mqar", "--preset", name, "--dump-config"]) == 0
    dumped = capsys.readouterr().out
    path = tmp_path / "preset.json"
    path.write_text(dumped)
    assert main(["mqar", "--config", str(path), "--dump-config"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(dumped)
    assert MQARPreset.from_dict(json.loads(dumped)) == MQARPreset.from_dict(get_preset(name))


def test_from_dict_copies_and_to_dict_round_trips():
    raw = get_preset("quick")
    kept = copy.deepcopy(raw)
    preset = MQARPreset.from_dict(raw)
    preset.models["ramnet"]["mixer"]["kwargs"]["topk"] = 1
    assert raw == kept  # the caller's dict is not the preset's
    assert MQARPreset.from_dict(preset.to_dict()) == preset
    assert as_preset(preset) is preset and as_preset(raw) == MQARPreset.from_dict(raw)
    with pytest.raises(TypeError, match="MQARPreset or its dict form"):
        as_preset([raw])


def test_model_entries_are_checked_at_construction():
    raw = get_preset("quick")
    raw["models"]["gdn"] = {"mixer": {"name": "fla.GatedDeltaNet"}}  # checked by form: fla need not be installed
    MQARPreset.from_dict(raw)
    raw["models"]["bad"] = {"mixer": {"name": "attention", "kwargs": [1]}}
    with pytest.raises(ValueError, match="model 'bad': a mixer spec's 'kwargs' must be a dict"):
        MQARPreset.from_dict(raw)


@pytest.mark.parametrize("change,match", [
    (dict(vocab_size=100), r"preset\['train'\] setting \[128, 8, 1000\]: vocab_size must be larger than seq_len"),
    (dict(vocab_size=1024), r"preset\['test'\] setting \[1024, 256, 100\]: vocab_size must be larger than seq_len"),
    (dict(test=[[64, 4, 0]]), r"preset\['test'\] setting \[64, 4, 0\]: examples must be an int >= 1"),
    (dict(seed=-1), r"preset\['seed'\] must be an int >= 0"),
    (dict(weight_decay=float("nan")), r"preset\['weight_decay'\] must be a finite number >= 0"),
    (dict(ablation="X"), r"preset\['ablation'\] must be one of \[None, 'U', 'M'\]"),
    (dict(description=3), r"preset\['description'\] must be a string"),
])
def test_bad_values_name_the_key(change, match):
    with pytest.raises(ValueError, match=match):
        MQARPreset.from_dict({**get_preset("quick"), **change})


def test_describe_cuts_takes_either_form():
    quick = get_preset("quick")
    assert describe_cuts(quick) == describe_cuts(MQARPreset.from_dict(quick)) != []
