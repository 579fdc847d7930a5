"""The synthetic-task LM: mixer registry and specs, state-size formulas of every mixer, errors."""

import importlib.util

import pytest
import torch
import torch.nn as nn

from ramnet.mqar.model import MIXERS, MQARModel, STATE_FORMULAS, mixer_state_size, resolve_mixer
from ramnet.mqar.presets import ABLATION_M, ABLATION_U, PAPER
from ramnet.mqar.sweep import check_models_runnable

CPU_MIXERS = {name: spec for name, spec in (
    ("ramnet", {"name": "ramnet", "kwargs": {"num_heads": 2, "head_v_dim": "d_model/2", "num_partitions": 2,
                                             "partition_dim": 4, "topk": 2}}),
    ("attention", {"name": "attention", "kwargs": {"num_heads": 2}}),
    ("sliding_window", {"name": "sliding_window", "kwargs": {"window": 4}}),
    ("linear_attention", {"name": "linear_attention", "kwargs": {"feature_dim": 4}}),
    ("hybrid", {"name": "hybrid", "kwargs": {"num_heads": 2, "head_v_dim": "d_model/2", "num_partitions": 2,
                                             "partition_dim": 4, "topk": 2, "window_size": 4}}),
)}


class RecordingMixer(nn.Module):
    """A user's own layer, plugged in by path: returns a bare tensor, has no state_size, and
    records the keyword arguments it is called with."""

    def __init__(self, hidden_size, layer_idx=None, scale=1.0):
        super().__init__()
        self.proj, self.layer_idx, self.scale, self.calls = nn.Linear(hidden_size, hidden_size), layer_idx, scale, []

    def forward(self, hidden_states, **kwargs):
        self.calls.append(kwargs)
        return self.proj(hidden_states) * self.scale


class VFirstMixer(RecordingMixer):
    """Mimics fla's RWKV-7: returns (o, None, cache, v_first)."""

    def forward(self, hidden_states, **kwargs):
        self.calls.append(kwargs)
        return self.proj(hidden_states), None, None, hidden_states


@pytest.mark.parametrize("name", list(CPU_MIXERS))
def test_forward_shapes_and_selected_logits(name):
    torch.manual_seed(0)
    model = MQARModel(64, 16, CPU_MIXERS[name]).eval()
    x = torch.randint(0, 64, (2, 10))
    logits = model(x)
    assert logits.shape == (2, 10, 64)
    select = torch.zeros(2, 10, dtype=torch.bool)
    select[0, 3] = select[1, 7] = True
    torch.testing.assert_close(model(x, select), logits[select])
    # tied head; the first block is the short convolution
    assert model.lm_head.weight is model.embedding.weight
    assert type(model.mixers()[0]).__name__ == "ShortConv" and len(model.mixers()) == 2


def test_state_size_sums_layers_with_zoology_formulas():
    d, L = 16, 100
    sizes = {name: MQARModel(64, d, spec).state_size(L) for name, spec in CPU_MIXERS.items()}
    conv = d * 3
    assert sizes["ramnet"] == conv + 2 * 4 ** 2 * (8 + 1)  # H * M * (d_v + 1)
    assert sizes["attention"] == conv + 2 * d * L
    assert sizes["sliding_window"] == conv + 2 * 4 * d
    assert sizes["linear_attention"] == conv + 1 * (d + 1) * (4 * 5 // 2 + 4 + 1)
    # the hybrid: RAM-Net's memory plus a window of 4 keys (d_k 8) and values (d_v 8) per head
    assert sizes["hybrid"] == sizes["ramnet"] + 4 * 2 * (8 + 8)
    # without the convolution both layers are RAM-Net
    two = MQARModel(64, d, CPU_MIXERS["ramnet"], short_conv=0)
    assert two.state_size(L) == 2 * (2 * 16 * 9)


def _fake(full_name, **attrs):
    """An instance of a class whose full name is ``full_name`` (fla is not installed on CPU)."""
    module, _, name = full_name.rpartition(".")
    cls = type(name, (nn.Module,), {"__module__": module})
    obj = cls()
    for key, value in attrs.items():
        setattr(obj, key, value)
    return obj


class ShortConvolution(nn.Conv1d):  # fla's short convolution is a depthwise Conv1d of this name
    pass


def test_fla_state_formulas():
    gla = _fake("fla.layers.gla.GatedLinearAttention", key_dim=32, head_v_dim=32)
    assert mixer_state_size(gla, 1024) == 32 * 32
    gla.q_conv1d = ShortConvolution(32, 32, 4, groups=32)  # + conv state, channels x kernel
    assert mixer_state_size(gla, 1024) == 32 * 32 + 32 * 4
    assert mixer_state_size(_fake("fla.layers.delta_net.DeltaNet", num_heads=2, head_k_dim=32, head_v_dim=32), 1) \
        == 2 * 32 * 32
    assert mixer_state_size(_fake("fla.layers.gated_deltanet.GatedDeltaNet", num_v_heads=2, head_k_dim=32,
                                  head_v_dim=64), 1) == 2 * 32 * 64
    # RWKV-7: H d_h^2, + the token shift's previous token (hidden_size floats)
    assert mixer_state_size(_fake("fla.layers.rwkv7.RWKV7Attention", num_heads=1, head_dim=64, head_v_dim=64,
                                  hidden_size=64), 1) == 64 * 64 + 64
    # Mamba2 / Mamba: Zoology's 2 d d_state, + the conv1d's channels x kernel
    assert mixer_state_size(_fake("fla.layers.mamba2.Mamba2", hidden_size=64, ssm_state_size=16, conv_dim=160,
                                  conv_kernel_size=4), 1) == 2 * 64 * 16 + 160 * 4
    assert mixer_state_size(_fake("fla.layers.mamba.Mamba", hidden_size=64, ssm_state_size=16, intermediate_size=128,
                                  conv_kernel_size=4), 1) == 2 * 64 * 16 + 128 * 4
    # Raven: both slot memories, H slots (d_k + d_v)
    assert mixer_state_size(_fake("fla.layers.raven.Raven", num_heads=2, num_slots=64, head_k_dim=32,
                                  head_v_dim=16), 1) == 2 * 64 * (32 + 16)
    # every fla entry of the registry has a formula, under the class's full name
    fla_classes = {path.rpartition(".")[2] for name, path in MIXERS.items() if name.startswith("fla.")}
    assert fla_classes == {key.rpartition(".")[2] for key in STATE_FORMULAS if key.startswith("fla.")}
    assert mixer_state_size(_fake("somewhere.Else"), 1) is None


def test_user_layer_by_path_per_layer_kwargs_and_unknown_state():
    spec = {"path": f"{__name__}.RecordingMixer", "kwargs": {"scale": 2.0}, "per_layer": [{"scale": 3.0}, {}]}
    model = MQARModel(32, 8, spec, short_conv=0)
    assert [m.scale for m in model.mixers()] == [3.0, 2.0]
    assert [m.layer_idx for m in model.mixers()] == [0, 1]
    model(torch.randint(0, 32, (1, 5)))
    assert model.state_size(5) is None


class DepthMixer(RecordingMixer):
    """Mimics fla's RWKV-7, which initialises by depth and fails without num_hidden_layers."""

    def __init__(self, hidden_size, layer_idx=None, num_hidden_layers=None):
        super().__init__(hidden_size, layer_idx)
        self.depth = layer_idx / (num_hidden_layers - 1)


def test_depth_aware_layers_learn_the_model_depth():
    model = MQARModel(32, 8, {"path": f"{__name__}.DepthMixer"}, n_layers=2, short_conv=3)
    assert [m.depth for m in model.mixers()[1:]] == [0.0]  # one mixer layer after the convolution, of 2 layers
    model = MQARModel(32, 8, {"path": f"{__name__}.DepthMixer", "kwargs": {"num_hidden_layers": 5}}, short_conv=0)
    assert [m.depth for m in model.mixers()] == [0.0, 0.25]  # the spec's value wins


def test_v_first_reaches_later_layers():
    model = MQARModel(32, 8, {"path": f"{__name__}.VFirstMixer"}, n_layers=3, short_conv=0)
    model(torch.randint(0, 32, (1, 5)))
    first, second, third = model.mixers()
    assert first.calls == [{}]
    assert set(second.calls[0]) == {"v_first"} and set(third.calls[0]) == {"v_first"}


def test_d_model_sizes_follow_the_width():
    spec = CPU_MIXERS["ramnet"]
    for d in (16, 32):
        assert MQARModel(64, d, spec).mixers()[1].head_v_dim == d // 2
    with pytest.raises(ValueError, match="not divisible"):
        MQARModel(64, 15, spec)
    with pytest.raises(ValueError, match="d_model size"):
        MQARModel(64, 16, {"name": "attention", "kwargs": {"num_heads": "d_model-2"}})


@pytest.mark.parametrize("spec,match", [
    ({"name": "nope"}, "unknown mixer name"),
    ({"name": "attention", "path": "a.B"}, "exactly one of"),
    ({"path": "NoDots"}, "package.module.Class"),
    ({"path": "ramnet.mqar.mixers.Nope"}, "has no 'Nope'"),
    ({"name": "attention", "extra": 1}, "exactly one of"),
    ({"name": "attention", "kwargs": [1]}, "'kwargs' must be a dict"),
    ({"name": "attention", "kwargs": {"bogus": 1}}, "cannot build mixer"),
    ({"name": "attention", "per_layer": [{}, {}]}, "per_layer must be a list of 1"),
])
def test_bad_specs_raise_clear_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        MQARModel(64, 16, spec)


def test_bad_model_config_raises():
    for kwargs in ({"n_layers": 1}, {"short_conv": -1}, {"mlp_mult": 1.5}, {"embed_dropout": 1.0}):
        with pytest.raises(ValueError):
            MQARModel(64, 16, CPU_MIXERS["attention"], **kwargs)


def test_mlp_blocks():
    model = MQARModel(64, 16, CPU_MIXERS["attention"], mlp_mult=4)
    assert all(b.mlp.fc1.out_features == 64 for b in model.blocks)
    assert model(torch.randint(0, 64, (1, 6))).shape == (1, 6, 64)


@pytest.mark.skipif(importlib.util.find_spec("fla") is not None, reason="flash-linear-attention is installed")
def test_fla_mixers_fail_clearly_without_fla_or_gpu():
    with pytest.raises(ImportError, match=r"flash-linear-attention.*ramnet\[baselines\]"):
        resolve_mixer({"name": "fla.GatedDeltaNet"})
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        check_models_runnable({"models": {"gdn": {"mixer": {"name": "fla.GatedDeltaNet"}}}}, "cpu")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        check_models_runnable({"models": {"x": {"mixer": {"path": "fla.layers.GatedDeltaNet"}}}}, "cpu")


def test_every_preset_ramnet_builds_and_runs():
    """The paper's (M 16 to 4096, and K 16 at M 256) and both ablations' RAM-Net configs (U = 1 with d_p = 4096
    up to U = 12)."""
    entries = [e for p in (PAPER, ABLATION_U, ABLATION_M) for e in p["models"].values()
               if e["mixer"]["name"] == "ramnet"]
    assert len(entries) == 6 + 6 + 4
    x = torch.randint(0, 64, (1, 8))
    for entry in entries:
        torch.manual_seed(0)
        model = MQARModel(64, 64, entry["mixer"])
        assert model(x).shape == (1, 8, 64)
        kw = entry["mixer"]["kwargs"]
        assert model.state_size(1024) == 64 * 3 + 2 * kw["partition_dim"] ** kw["num_partitions"] * 33
