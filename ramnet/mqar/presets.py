"""MQAR presets (Zoology's protocol, as the RAM-Net paper runs it): the built-in ones as data, ``MQARPreset`` to
validate one, and its JSON form.

A preset holds the data settings ``[seq_len, kv_pairs, examples]``, the optimisation, the d_model
sweep, the shared model config and the models, each ``{"mixer": spec, "model": overrides, "lrs":
[...]}`` with the last two optional. The built-in ones (``PRESETS``) are plain dicts in that JSON
form, which ``--dump-config`` prints and ``--config FILE.json`` reads; ``MQARPreset.from_dict``
validates one. Every (d_model, model, lr) is one run (``ramnet.mqar.sweep``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..ops.checks import check_choice, check_int, check_positive
from .data import check_reassign, check_setting
from .model import check_mixer_spec, needs_cuda

PAPER_TRAIN = [[64, 4, 100_000], [128, 8, 20_000], [256, 16, 20_000], [256, 32, 20_000], [256, 64, 20_000]]
PAPER_TEST = [[64, 4, 1000], [64, 8, 1000], [64, 16, 1000], [128, 32, 1000], [256, 64, 1000],
              [512, 128, 1000], [1024, 256, 1000]]
PAPER_LRS = [10 ** (-3 + 0.5 * i) for i in range(4)]  # np.logspace(-3, -1.5, 4)


def ramnet_mixer(num_partitions: int, partition_dim: int, topk: int = 8, num_heads: int = 2,
                 gamma: float | None = None) -> dict:
    """RAM-Net for MQAR: heads split d_model (head_v_dim = d_model / heads); the short
    convolution of the first layer provides the shift, so addresses are absolute (no CAPE: with
    CAPE a key written at t and queried at t' lands on slots shifted by t' - t). ``gamma``: PDMA's
    decay power, the layer's default (1) unless given."""
    kwargs = {"num_heads": num_heads, "head_v_dim": f"d_model/{num_heads}", "num_partitions": num_partitions,
              "partition_dim": partition_dim, "topk": topk}  # mode None: the Triton kernels on CUDA
    if gamma is not None:
        kwargs["gamma"] = gamma
    return {"name": "ramnet", "kwargs": kwargs}


# The CPU baselines as in Zoology's MQAR configs (attention: 1 head, attention dropout 0.1;
# sliding window: no dropout; linear attention: Based's Taylor map, feature_dim 16, 1 head).
BASELINES = {
    "attention": {"mixer": {"name": "attention", "kwargs": {"num_heads": 1, "dropout": 0.1}}},
    "sliding_window": {"mixer": {"name": "sliding_window", "kwargs": {"window": 64}}},
    "linear_attention": {"mixer": {"name": "linear_attention", "kwargs": {"feature_dim": 16, "feature_map": "taylor"}}},
}
# H3 with its paper's defaults (d_state 64, head_dim 1: state 2 d_model d_state per layer), written in
# the project (ramnet/mqar/h3.py): fla has none.
H3_MIXER = {"name": "h3", "kwargs": {"d_state": 64, "head_dim": 1}}
# fla's layers with the settings of Zoology's models_repo where it has them. Mamba and Mamba2
# carry their own short convolution (Zoology's Mamba blocks have no conv layer before them).
FLA_BASELINES = {
    "gla": {"mixer": {"name": "fla.GLA", "kwargs": {"num_heads": 2, "use_short_conv": False}}},
    # fused_recurrent: fla's chunked DeltaNet refuses fp32 inputs, and every model here trains in fp32.
    "delta_net": {"mixer": {"name": "fla.DeltaNet", "kwargs": {
        "num_heads": 2, "use_gate": False, "conv_size": 4, "mode": "fused_recurrent"}}},
    "gated_delta_net": {"mixer": {"name": "fla.GatedDeltaNet", "kwargs": {
        "num_heads": 2, "head_dim": "d_model/2", "expand_v": 2, "use_gate": False, "conv_size": 4}}},
    "rwkv7": {"mixer": {"name": "fla.RWKV7", "kwargs": {
        "head_dim": 64, "decay_low_rank_dim": 16, "gate_low_rank_dim": 64, "a_low_rank_dim": 16,
        "v_low_rank_dim": 16}}},
    "mamba2": {"mixer": {"name": "fla.Mamba2", "kwargs": {"state_size": 16}}, "model": {"short_conv": 0}},
    # Raven (fla's, GSA kernels with top-k slot routing) in its published shapes: 64 and 256 slots per
    # head, top-k 32, 2 heads of d_model / 2 as the other baselines. State: both slot memories,
    # H * slots * (d_k + d_v) (ramnet/mqar/model.py, STATE_FORMULAS).
    "raven": {"mixer": {"name": "fla.Raven", "kwargs": {"num_heads": 2, "num_slots": 64, "topk": 32}}},
    "raven slots=256": {"mixer": {"name": "fla.Raven", "kwargs": {"num_heads": 2, "num_slots": 256, "topk": 32}}},
    "mamba (for H3)": {"mixer": {"name": "fla.Mamba", "kwargs": {"state_size": 16, "intermediate_size": "d_model*2"}},
                       "model": {"short_conv": 0}},
}

PAPER = {
    "description": "the RAM-Net paper's MQAR protocol (Zoology / Based configs)",
    "seed": 0,
    "vocab_size": 8192,
    "train": PAPER_TRAIN,
    "test": PAPER_TEST,
    "batch_size": 256,
    "test_batch_size": 32,
    "epochs": 32,
    "lrs": PAPER_LRS,
    "weight_decay": 0.1,
    "early_stop": 0.99,
    "d_models": [64, 128, 256],
    # Zoology's Based MQAR configs: 2 layers, the first a short convolution, no MLP (Identity).
    "model": {"n_layers": 2, "short_conv": 3, "mlp_mult": 0, "embed_dropout": 0.1},
    # RAM-Net at M = 256 and M = 4096 slots: two points per d_model on the accuracy-state curve.
    # Small partitions train better at equal M (benchmarks/results/mqar/README.md): M = 256 as
    # U 4 x d_p 4 (0.818 on the quick preset, U 2 x d_p 16 0.788) and M = 4096 as U 6 x d_p 4 (0.993
    # in 2 epochs on the GPU ablation over U, U 3 x d_p 16 0.978 in 4).
    # K = 16 as well: on the quick preset it lifts RAM-Net from 0.73 to 0.78 at the same state size
    # (benchmarks/results/mqar/README.md); K = 8 is the paper's LM setting.
    # The RAM-Net line of the accuracy-state figure: M = 4^U for U = 2 ... 6 (16 to 4096 slots), 2 heads of
    # d_model / 2, so the state 2 M (d_model / 2 + 1) spans about 1k floats (M 16 at d_model 64) to 530k
    # (M 4096 at d_model 128), between the baselines' sizes. No CAPE (see ramnet_mixer).
    "models": {"ramnet M=16": {"mixer": ramnet_mixer(2, 4)}, "ramnet M=64": {"mixer": ramnet_mixer(3, 4)},
               "ramnet": {"mixer": ramnet_mixer(4, 4)}, "ramnet K=16": {"mixer": ramnet_mixer(4, 4, topk=16)},
               "ramnet M=1024": {"mixer": ramnet_mixer(5, 4)}, "ramnet M=4096": {"mixer": ramnet_mixer(6, 4)},
               **BASELINES, "h3": {"mixer": H3_MIXER}, **FLA_BASELINES},
}

QUICK = {
    **PAPER,
    "description": "a CPU smoke run of the paper protocol: RAM-Net vs three baselines at d_model 64",
    # 2048 is the smallest power of two larger than the longest test setting's L = 1024, as Zoology
    # requires (vocab_size > seq_len; 1024, used before, is refused); with 8192 the embeddings of 4096
    # keys barely train in a few epochs.
    "vocab_size": 2048,
    "train": [[64, 4, 8000], [128, 8, 1000], [256, 16, 500]],
    "test": [[L, N, 100] for L, N, _ in PAPER_TEST],
    "batch_size": 32,
    "epochs": 7,
    "lrs": [3e-3],
    "d_models": [64],
    # K = 16 and U 4 x d_p 4: the best of the settings tried on this preset (benchmarks/results/mqar/README.md).
    "models": {"ramnet": {"mixer": ramnet_mixer(4, 4, topk=16)}, **BASELINES},
}

# Fig. 4 of the paper: at fixed M = 4096 the accuracy rises with U; at fixed U it rises with M.
ABLATION_U = {
    **PAPER,
    "description": "RAM-Net at fixed M = 4096 = d_p ** U, K = 8, for U in 1, 2, 3, 4, 6, 12",
    "ablation": "U",
    "d_models": [64],
    "models": {f"ramnet U={u} d_p={dp}": {"mixer": ramnet_mixer(u, dp)}
               for u, dp in [(1, 4096), (2, 64), (3, 16), (4, 8), (6, 4), (12, 2)]},
}
# At U = 4, not U = 2: on the GPU U ablation, U 2 x d_p 64 stayed at 0.45 where U >= 4 passed 0.99
# at the same M, so growing M through d_p at U = 2 would measure the wide softmax, not the memory.
ABLATION_M = {
    **PAPER,
    "description": "RAM-Net at U = 4, K = 8, with M = d_p ** 4 growing from 16 to 65536",
    "ablation": "M",
    "d_models": [64],
    "models": {f"ramnet U=4 d_p={dp}": {"mixer": ramnet_mixer(4, dp)} for dp in (2, 4, 8, 16)},
}


def hybrid_mixer(num_partitions: int, partition_dim: int, window: int = 64, num_heads: int = 2) -> dict:
    """The synchronous hybrid (Irie, Yau, Gershman, arXiv 2506.00744): sliding-window attention over ``window`` tokens and
    RAM-Net (U x d_p, K = 8) on shared projections, mixed by a per-channel gate."""
    return {"name": "hybrid", "kwargs": {"num_heads": num_heads, "head_v_dim": f"d_model/{num_heads}",
                                         "num_partitions": num_partitions, "partition_dim": partition_dim, "topk": 8,
                                         "window_size": window, "blend": "synchronous", "mix": "vector"}}


# The hybrid's MQAR comparison: does the synchronous hybrid reach 0.99 at a smaller state than RAM-Net
# alone? The paper protocol at d_model 64 and 128, the hybrid at M = 64 and 256 against RAM-Net at
# M = 256 and 4096, sliding window 64 and full attention.
HYBRID = {
    **PAPER,
    "description": "the synchronous RAM-Net + sliding-window hybrid (window 64) against its parts",
    "d_models": [64, 128],
    "models": {"hybrid M=64": {"mixer": hybrid_mixer(3, 4)}, "hybrid M=256": {"mixer": hybrid_mixer(4, 4)},
               "ramnet": {"mixer": ramnet_mixer(4, 4)}, "ramnet M=4096": {"mixer": ramnet_mixer(6, 4)},
               "sliding_window": BASELINES["sliding_window"], "attention": BASELINES["attention"]},
}

# Beyond the paper: MQAR with forgetting (ramnet.mqar.data.generate, ``reassign``). Half the keys
# (rounded up) are written a second time with new values after the pairs, and every query asks for
# the latest value. PDMA claims that forgetting is decoupled from writing: gamma 0 (a running mean,
# no forgetting) should fail the re-assigned keys, gamma 1 (EMA) and 2 forget. Every setting keeps
# L >= 4N + 2R (the paper's (L, N) would not fit the re-assignments): N is cut to L / 5 where the
# paper's is larger. The paper's protocol otherwise (run it with --protocol two-stage).
FORGETTING_TRAIN = [[64, 4, 100_000], [128, 8, 20_000], [256, 16, 20_000], [256, 32, 20_000], [256, 48, 20_000]]
FORGETTING_TEST = [[64, 4, 1000], [64, 8, 1000], [128, 16, 1000], [256, 32, 1000], [256, 48, 1000],
                   [512, 96, 1000], [1024, 192, 1000]]
FORGETTING = {
    **PAPER,
    "description": "MQAR with forgetting: half the keys re-assigned new values, queries ask for the latest",
    "reassign": 0.5,
    "train": FORGETTING_TRAIN,
    "test": FORGETTING_TEST,
    "d_models": [64, 128],
    "models": {**{f"ramnet gamma={g}": {"mixer": ramnet_mixer(4, 4, gamma=float(g))} for g in (0, 1, 2)},
               "delta_net": FLA_BASELINES["delta_net"], "gated_delta_net": FLA_BASELINES["gated_delta_net"],
               "attention": BASELINES["attention"]},
}
# Its CPU smoke run: the CPU models of the forgetting preset at d_model 64, on a vocabulary of 512 and
# the first three test settings, 3-5 minutes on 2 cores. It checks that the variant runs end to end;
# it is far too short for anything to learn (313 steps; RAM-Net took about 1,600 to reach 0.75 on
# plain MQAR on the CPU: benchmarks/results/mqar/README.md).
FORGETTING_QUICK = {
    **FORGETTING,
    "description": "a CPU smoke run of the forgetting preset: RAM-Net gamma 0 / 1 / 2 and attention at d_model 64",
    "vocab_size": 512,
    "train": [[64, 4, 4000], [128, 8, 1000]],
    "test": [[L, N, 100] for L, N, _ in FORGETTING_TEST[:3]],
    "batch_size": 32,
    "epochs": 2,
    "lrs": [3e-3],
    "d_models": [64],
    "models": {name: entry for name, entry in FORGETTING["models"].items() if not needs_cuda(entry["mixer"])},
}

PRESETS = {"quick": QUICK, "paper": PAPER, "ablation-u": ABLATION_U, "ablation-m": ABLATION_M, "hybrid": HYBRID,
           "forgetting": FORGETTING, "forgetting-quick": FORGETTING_QUICK}
MODEL_ENTRY_KEYS = {"mixer", "model", "lrs"}
MODEL_CONFIG_KEYS = {"n_layers", "short_conv", "mlp_mult", "embed_dropout"}  # MQARModel's own arguments
ABLATIONS = (None, "U", "M")
PROTOCOL_KEYS = ("vocab_size", "train", "test", "batch_size", "test_batch_size", "epochs", "weight_decay", "early_stop")
PROTOCOLS = ("full", "two-stage")  # how the lr sweep is run (ramnet.mqar.sweep.run_preset)


@dataclass
class MQARPreset:
    """One MQAR sweep, checked when built: a ValueError names the first thing wrong."""

    seed: int  # model init and data; train and test streams are seeded apart
    vocab_size: int
    train: list  # [[seq_len, kv_pairs, examples], ...]: the training mixture
    test: list  # [[seq_len, kv_pairs, examples], ...]: one accuracy per setting
    batch_size: int
    test_batch_size: int
    epochs: int
    lrs: list  # the lr sweep of every model without lrs of its own
    weight_decay: float
    early_stop: float  # training stops once the average test accuracy exceeds this
    d_models: list
    model: dict  # MQARModel arguments shared by every model (keys among MODEL_CONFIG_KEYS)
    models: dict  # name -> {"mixer": spec, "model": overrides of `model`, "lrs": [...]}
    description: str = ""
    ablation: str | None = None  # "U" or "M": a RAM-Net ablation, drawn against U or M
    name: str | None = None  # each row's "preset"
    reassign: float = 0.0  # the forgetting variant: fraction of keys re-assigned (ramnet.mqar.data.generate)

    def __post_init__(self):
        self.seed = check_int("preset['seed']", self.seed, 0)
        for key in ("vocab_size", "batch_size", "test_batch_size", "epochs"):
            setattr(self, key, check_int(f"preset[{key!r}]", getattr(self, key), 1))
        try:
            self.reassign = check_reassign(self.reassign)
        except ValueError as err:
            raise ValueError(f"preset['reassign']: {err}") from None
        self.train = _check_settings("train", self.train, self.vocab_size, self.reassign)
        self.test = _check_settings("test", self.test, self.vocab_size, self.reassign)
        self.lrs = _check_lrs("preset['lrs']", self.lrs)
        if not isinstance(self.d_models, (list, tuple)) or not self.d_models:
            raise ValueError(f"preset['d_models'] must be a non-empty list of ints, got {self.d_models!r}")
        self.d_models = [check_int(f"preset['d_models'][{i}]", d, 1) for i, d in enumerate(self.d_models)]
        for key in ("weight_decay", "early_stop"):
            setattr(self, key, check_positive(f"preset[{key!r}]", getattr(self, key), allow_zero=True))
        _check_model_config("preset['model']", self.model)
        if not isinstance(self.models, dict) or not self.models:
            raise ValueError("preset['models'] must be a non-empty dict name -> {'mixer': spec, ...}")
        for name, entry in self.models.items():
            _check_model_entry(name, entry)
        check_choice("preset['ablation']", self.ablation, ABLATIONS)
        if not isinstance(self.description, str):
            raise ValueError(f"preset['description'] must be a string, got {self.description!r}")
        if self.name is not None and not isinstance(self.name, str):
            raise ValueError(f"preset['name'] must be a string, got {self.name!r}")

    @classmethod
    def from_dict(cls, preset: dict) -> MQARPreset:
        """Validate a preset's JSON form (the caller's dict is left as it is)."""
        if not isinstance(preset, dict):
            raise ValueError(f"a preset is a dict, got {type(preset).__name__}")
        fields = dataclasses.fields(cls)
        required = {f.name for f in fields if f.default is dataclasses.MISSING}
        missing, unknown = required - set(preset), set(preset) - {f.name for f in fields}
        if missing or unknown:
            raise ValueError(f"preset: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
        return cls(**copy.deepcopy(preset))

    def to_dict(self) -> dict:
        """The JSON form, which ``from_dict`` reads back."""
        return dataclasses.asdict(self)

    def protocol(self) -> dict:
        """What every run of this preset shares besides its seed, model and d_model: the data and the
        optimisation. Stored with each row (``ramnet.mqar.report`` keys results by it). ``reassign``
        only where it is set: plain MQAR's protocol is the one its rows always recorded."""
        protocol = {key: copy.deepcopy(getattr(self, key)) for key in PROTOCOL_KEYS}
        if self.reassign:
            protocol["reassign"] = self.reassign
        return protocol


def _check_settings(key: str, settings, vocab_size: int, reassign: float = 0.0) -> list[list[int]]:
    if not isinstance(settings, (list, tuple)) or not settings or not all(
            isinstance(s, (list, tuple)) and len(s) == 3 for s in settings):
        raise ValueError(f"preset[{key!r}] must be a non-empty list of [seq_len, kv_pairs, examples] ints, "
                         f"got {settings!r}")
    for seq_len, pairs, examples in settings:
        try:
            check_setting(seq_len, pairs, vocab_size, reassign)
            check_int("examples", examples, 1)
        except ValueError as err:
            raise ValueError(f"preset[{key!r}] setting {[seq_len, pairs, examples]}: {err}") from None
    return [list(s) for s in settings]


def _check_lrs(where: str, lrs) -> list[float]:
    if not isinstance(lrs, (list, tuple)) or not lrs:
        raise ValueError(f"{where} must be a non-empty list of positive numbers, got {lrs!r}")
    return [check_positive(f"{where}[{i}]", lr) for i, lr in enumerate(lrs)]


def _check_model_config(where: str, config) -> None:
    if not isinstance(config, dict) or set(config) - MODEL_CONFIG_KEYS:
        raise ValueError(f"{where} must be a dict with keys among {sorted(MODEL_CONFIG_KEYS)}, got {config!r}")


def _check_model_entry(name: str, entry) -> None:
    if not isinstance(entry, dict) or "mixer" not in entry or set(entry) - MODEL_ENTRY_KEYS:
        raise ValueError(f"model {name!r}: an entry is {{'mixer': spec, 'model': {{...}}, 'lrs': [...]}}, "
                         f"got {entry!r}")
    try:
        check_mixer_spec(entry["mixer"])
    except ValueError as err:
        raise ValueError(f"model {name!r}: {err}") from None
    if "lrs" in entry:
        entry["lrs"] = _check_lrs(f"model {name!r}: lrs", entry["lrs"])
    _check_model_config(f"model {name!r}: 'model'", entry.get("model", {}))


def as_preset(preset: MQARPreset | dict) -> MQARPreset:
    """``preset`` itself, or its JSON form validated into an MQARPreset."""
    if isinstance(preset, MQARPreset):
        return preset
    if isinstance(preset, dict):
        return MQARPreset.from_dict(preset)
    raise TypeError(f"preset must be an MQARPreset or its dict form, got {type(preset).__name__}")


def check_preset(preset: dict) -> dict:
    """Raise ValueError naming the first thing wrong with a preset's JSON form; return that form as
    ``MQARPreset.to_dict`` writes it."""
    return MQARPreset.from_dict(preset).to_dict()


def get_preset(name: str) -> dict:
    """A copy of the built-in preset ``name`` in its JSON form, with its name."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return {**copy.deepcopy(PRESETS[name]), "name": name}


def read_preset_file(path: str | Path) -> dict:
    """A preset's JSON form from a file, named after the file unless it names itself."""
    path = Path(path)
    try:
        preset = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the preset file {path}: {err}") from err
    if not isinstance(preset, dict):
        raise ValueError(f"the preset file {path} must hold a JSON object")
    preset.setdefault("name", path.stem)
    return preset


def describe_cuts(preset: MQARPreset | dict, protocol: str = "full", screen_epochs: int | None = None) -> list[str]:
    """Where a preset departs from the paper protocol (mostly: runs less of it), one line each; for
    the forgetting variant, from the ``forgetting`` preset's protocol. ``protocol`` "two-stage" (with
    its ``screen_epochs``) adds the line of its lr sweep cut (``ramnet.mqar.sweep.run_preset``)."""
    preset, cuts = as_preset(preset), []
    check_choice("protocol", protocol, PROTOCOLS)
    reference, ref_name = (FORGETTING, "the forgetting protocol") if preset.reassign else (PAPER, "the paper")
    for key in ("train", "test"):
        paper = {(L, N): n for L, N, n in reference[key]}
        ours = {(L, N): n for L, N, n in getattr(preset, key)}
        for (L, N), n in paper.items():
            if ours.get((L, N), 0) < n:
                cuts.append(f"{key} (L={L}, N={N}): {ours.get((L, N), 0)} examples instead of {n}")
    for key in ("vocab_size", "epochs", "batch_size", "reassign"):
        if getattr(preset, key) != reference.get(key, 0.0):
            cuts.append(f"{key}: {getattr(preset, key)} instead of {reference.get(key, 0.0)}"
                        + (f" ({ref_name})" if key == "reassign" else ""))
    if preset.lrs != reference["lrs"]:
        cuts.append(f"lrs: {_fmt_lrs(preset.lrs)} instead of the sweep {_fmt_lrs(reference['lrs'])}")
    if protocol == "two-stage":
        cuts.append(f"lr sweep in two stages, for every model alike: each lr of the sweep at {screen_epochs} "
                    f"epochs, then the best of them (and its neighbours in the sweep) at {preset.epochs} epochs, "
                    f"instead of every lr at {preset.epochs}")
    if preset.d_models != reference["d_models"]:
        cuts.append(f"d_models: {preset.d_models} instead of {reference['d_models']}")
    return cuts


def _fmt_lrs(lrs) -> str:
    return "[" + ", ".join(f"{lr:.2g}" for lr in lrs) + "]"
