"""MQARPreset: validation at construction and the JSON form that --dump-config and --config share."""

import copy
import json

import pytest
import torch.nn as nn

from ramnet.cli import main
from ramnet.mqar.model import mixer_state_size, needs_cuda, resolve_d_model
from ramnet.mqar.presets import PAPER, PRESETS, MQARPreset, as_preset, describe_cuts, get_preset


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


# --- the paper preset's GPU baselines, accounted for without fla (construct-free) -------------------

def _fla_layer(spec: dict, d_model: int):
    """A stand-in of the fla 0.6.0 layer that ``spec`` builds at ``d_model``, with the attributes its
    constructor sets (read from fla/layers/{rwkv7,mamba2,raven}.py of fla 0.6.0) and the class's full
    name, so ``mixer_state_size`` applies the registry's formula to it."""
    kw = {k: resolve_d_model(v, d_model) for k, v in spec.get("kwargs", {}).items()}
    d = d_model
    if spec["name"] == "fla.RWKV7":
        heads = d // kw["head_dim"]
        attrs = dict(hidden_size=d, num_heads=heads, head_dim=kw["head_dim"], head_v_dim=d // heads)
        cls = "fla.layers.rwkv7.RWKV7Attention"
    elif spec["name"] == "fla.Mamba2":
        inner, state = 2 * d, kw["state_size"]  # expand 2, n_groups 1, conv_kernel 4: fla's defaults
        attrs = dict(hidden_size=d, ssm_state_size=state, conv_dim=inner + 2 * state, conv_kernel_size=4)
        cls = "fla.layers.mamba2.Mamba2"
    elif spec["name"] == "fla.Raven":
        heads = kw["num_heads"]
        attrs = dict(num_heads=heads, num_slots=kw["num_slots"], head_k_dim=d // heads, head_v_dim=d // heads)
        cls = "fla.layers.raven.Raven"
    else:
        raise AssertionError(spec)
    module, _, name = cls.rpartition(".")
    layer = type(name, (nn.Module,), {"__module__": module})()
    for key, value in attrs.items():
        setattr(layer, key, value)
    return layer


def _model_state(entry: dict, d_model: int) -> int:
    """MQARModel.state_size of a preset entry, as the model sums it: the short convolution's
    d * kernel (the first layer, when there is one) and the mixer layers' formulas."""
    config = {**PAPER["model"], **entry.get("model", {})}
    mixers = config["n_layers"] - (1 if config["short_conv"] else 0)
    return d_model * config["short_conv"] + mixers * mixer_state_size(_fla_layer(entry["mixer"], d_model), 1024)


def test_the_paper_preset_has_the_gpu_baselines_with_their_state_sizes():
    models = get_preset("paper")["models"]
    for name in ("rwkv7", "mamba2", "raven", "raven slots=256", "h3"):
        assert name in models
    # Raven in its published shapes: 64 and 256 slots, top-k 32
    assert [(models[n]["mixer"]["kwargs"]["num_slots"], models[n]["mixer"]["kwargs"]["topk"])
            for n in ("raven", "raven slots=256")] == [(64, 32), (256, 32)]
    # by hand, at d_model 64 / 128 / 256:
    # RWKV-7, head_dim 64 (1 / 2 / 4 heads): H * 64^2 + d (token shift), after the short conv's 3 d
    assert [_model_state(models["rwkv7"], d) for d in (64, 128, 256)] == [
        3 * d + (d // 64) * 64 * 64 + d for d in (64, 128, 256)]
    assert _model_state(models["rwkv7"], 64) == 192 + 4096 + 64
    # Mamba2, d_state 16, two Mamba2 layers (no short conv): 2 d 16 + (2 d + 32) * 4 each
    assert [_model_state(models["mamba2"], d) for d in (64, 128, 256)] == [
        2 * (2 * d * 16 + (2 * d + 32) * 4) for d in (64, 128, 256)]
    assert _model_state(models["mamba2"], 64) == 2 * (2048 + 640)
    # Raven, 2 heads of d / 2: 2 * slots * d, after the short conv
    assert [_model_state(models["raven"], d) for d in (64, 128, 256)] == [3 * d + 2 * 64 * d for d in (64, 128, 256)]
    assert _model_state(models["raven slots=256"], 64) == 192 + 2 * 256 * 64
    for name in ("rwkv7", "mamba2", "raven", "raven slots=256"):
        assert needs_cuda(models[name]["mixer"])


@pytest.mark.parametrize("name", ["rwkv7", "mamba2", "raven"])
def test_the_gpu_baselines_are_refused_on_the_cpu_before_training(name, tmp_path, capsys):
    assert main(["mqar", "--preset", "paper", "--models", name, "--device", "cpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"model {name!r} uses fla." in err and "needs a CUDA GPU" in err
    assert not (tmp_path / "results.jsonl").exists()


# --- the forgetting presets ----------------------------------------------------------------------

def test_the_forgetting_preset():
    preset = MQARPreset.from_dict(get_preset("forgetting"))
    assert preset.reassign == 0.5 and preset.protocol()["reassign"] == 0.5
    assert "reassign" not in MQARPreset.from_dict(get_preset("paper")).protocol()  # plain MQAR rows as before
    gammas = {n: e["mixer"]["kwargs"].get("gamma") for n, e in preset.models.items() if e["mixer"]["name"] == "ramnet"}
    assert gammas == {"ramnet gamma=0": 0.0, "ramnet gamma=1": 1.0, "ramnet gamma=2": 2.0}
    assert set(preset.models) - set(gammas) == {"delta_net", "gated_delta_net", "attention"}
    assert preset.epochs == 32 and preset.batch_size == 256 and len(preset.test) == 7
    assert all(L >= 4 * N + 2 * ((N + 1) // 2) for L, N, _ in preset.train + preset.test)
    assert describe_cuts(preset) == []
    quick = MQARPreset.from_dict(get_preset("forgetting-quick"))
    assert quick.reassign == 0.5 and set(quick.models) == set(gammas) | {"attention"}
    assert not any(needs_cuda(e["mixer"]) for e in quick.models.values())
    assert "vocab_size: 512 instead of 8192" in describe_cuts(quick)


def test_reassign_is_checked_against_every_setting():
    with pytest.raises(ValueError, match=r"preset\['train'\] setting \[256, 64, 20000\]: seq_len must be >= "
                                         r"4 \* num_kv_pairs \+ 2 \* reassigned = 320"):
        MQARPreset.from_dict({**get_preset("paper"), "reassign": 0.5})  # the paper's (L, N) leave no room
    with pytest.raises(ValueError, match=r"preset\['reassign'\]: reassign must be a number in \[0, 1\]"):
        MQARPreset.from_dict({**get_preset("forgetting"), "reassign": 2})


def test_the_forgetting_variant_runs_end_to_end_on_a_tiny_size(tmp_path, capsys):
    preset = {**get_preset("forgetting-quick"), "vocab_size": 64, "train": [[16, 2, 32]], "test": [[16, 2, 8]],
              "batch_size": 16, "epochs": 1, "d_models": [16], "name": "tiny-forgetting"}
    preset["models"] = {m: preset["models"][m] for m in ("ramnet gamma=0", "attention")}
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(preset))
    assert main(["mqar", "--config", str(config), "--out", str(tmp_path / "res"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "cut or changed from the forgetting preset protocol:" in printed
    rows = [json.loads(line) for line in (tmp_path / "res" / "results.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == ["ramnet gamma=0", "attention"]
    assert all(r["protocol"]["reassign"] == 0.5 for r in rows)
