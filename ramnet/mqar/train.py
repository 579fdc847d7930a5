"""MQAR training and evaluation (Zoology's protocol, spec section 8), driven by presets.

A preset is a plain dict (see ``PRESETS``): data settings ``[seq_len, kv_pairs, examples]``,
optimisation, the d_model sweep, the shared model config and the models, each
``{"mixer": spec, "model": overrides, "lrs": [...]}`` with the last two optional. Every
(d_model, model, lr) is one run, written as one JSONL row; the reported result of a
(model, d_model) is its run with the best average accuracy (the lr sweep).

Protocol, as Zoology's trainer: AdamW with weight decay on every parameter, cosine annealing
stepped once per epoch down to 0, no warm-up or clipping; after every epoch the test settings
are evaluated and training stops once the average accuracy exceeds ``early_stop``; the reported
accuracies are those of the last evaluation. Batches never mix settings (their lengths differ).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import multiprocessing
import platform
import random
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..ops.checks import check_int
from .data import IGNORE, generate
from .model import MQARModel, needs_cuda, resolve_mixer

PAPER_TRAIN = [[64, 4, 100_000], [128, 8, 20_000], [256, 16, 20_000], [256, 32, 20_000], [256, 64, 20_000]]
PAPER_TEST = [[64, 4, 1000], [64, 8, 1000], [64, 16, 1000], [128, 32, 1000], [256, 64, 1000],
              [512, 128, 1000], [1024, 256, 1000]]
PAPER_LRS = [10 ** (-3 + 0.5 * i) for i in range(4)]  # np.logspace(-3, -1.5, 4)


def ramnet_mixer(num_partitions: int, partition_dim: int, topk: int = 8, num_heads: int = 2) -> dict:
    """RAM-Net for MQAR: heads split d_model (head_v_dim = d_model / heads); the short
    convolution of the first layer provides the shift, so addresses are absolute (no CAPE: with
    CAPE a key written at t and queried at t' lands on slots shifted by t' - t)."""
    return {"name": "ramnet", "kwargs": {"num_heads": num_heads, "head_v_dim": f"d_model/{num_heads}",
                                         "num_partitions": num_partitions, "partition_dim": partition_dim,
                                         "topk": topk}}  # mode None: the Triton kernels on CUDA


# The CPU baselines as in Zoology's MQAR configs (attention: 1 head, attention dropout 0.1;
# sliding window: no dropout; linear attention: Based's Taylor map, feature_dim 16, 1 head).
BASELINES = {
    "attention": {"mixer": {"name": "attention", "kwargs": {"num_heads": 1, "dropout": 0.1}}},
    "sliding_window": {"mixer": {"name": "sliding_window", "kwargs": {"window": 64}}},
    "linear_attention": {"mixer": {"name": "linear_attention", "kwargs": {"feature_dim": 16, "feature_map": "taylor"}}},
}
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
    "mamba (for H3)": {"mixer": {"name": "fla.Mamba", "kwargs": {"state_size": 16, "intermediate_size": "d_model*2"}},
                       "model": {"short_conv": 0}},
}

PAPER = {
    "description": "the RAM-Net paper's MQAR protocol (Zoology / Based configs, spec section 8)",
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
    "models": {"ramnet": {"mixer": ramnet_mixer(4, 4)}, "ramnet K=16": {"mixer": ramnet_mixer(4, 4, topk=16)},
               "ramnet M=4096": {"mixer": ramnet_mixer(6, 4)}, **BASELINES, **FLA_BASELINES},
}

QUICK = {
    **PAPER,
    "description": "a CPU smoke run of the paper protocol: RAM-Net vs three baselines at d_model 64",
    # 1024 is the smallest power of two whose key range [1, 512) holds the 256 keys of the
    # longest test setting; with 8192 the embeddings of 4096 keys barely train in a few epochs.
    "vocab_size": 1024,
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
    """The synchronous hybrid (spec section 9): sliding-window attention over ``window`` tokens and
    RAM-Net (U x d_p, K = 8) on shared projections, mixed by a per-channel gate."""
    return {"name": "hybrid", "kwargs": {"num_heads": num_heads, "head_v_dim": f"d_model/{num_heads}",
                                         "num_partitions": num_partitions, "partition_dim": partition_dim, "topk": 8,
                                         "window_size": window, "blend": "synchronous", "mix": "vector"}}


# Issue 6's MQAR comparison: does the synchronous hybrid reach 0.99 at a smaller state than RAM-Net
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

PRESETS = {"quick": QUICK, "paper": PAPER, "ablation-u": ABLATION_U, "ablation-m": ABLATION_M, "hybrid": HYBRID}
PRESET_KEYS = set(PAPER) | {"ablation", "name"}
OPTIONAL_KEYS = {"description", "ablation", "name"}
MODEL_ENTRY_KEYS = {"mixer", "model", "lrs"}
MODEL_CONFIG_KEYS = {"n_layers", "short_conv", "mlp_mult", "embed_dropout"}


def check_preset(preset: dict) -> dict:
    """Raise ValueError naming the first thing wrong with a preset; return it."""
    if not isinstance(preset, dict):
        raise ValueError(f"a preset is a dict, got {type(preset).__name__}")
    missing, unknown = PRESET_KEYS - OPTIONAL_KEYS - set(preset), set(preset) - PRESET_KEYS
    if missing or unknown:
        raise ValueError(f"preset: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
    for key in ("train", "test"):
        rows = preset[key]
        if not isinstance(rows, list) or not rows or not all(
                isinstance(r, (list, tuple)) and len(r) == 3 and all(_is_int(x) and x >= 1 for x in r) for r in rows):
            raise ValueError(f"preset[{key!r}] must be a non-empty list of [seq_len, kv_pairs, examples] ints, got {rows!r}")
        for seq_len, pairs, _ in rows:
            if seq_len % 2 or 4 * pairs > seq_len:
                raise ValueError(f"preset[{key!r}]: seq_len {seq_len} must be even and >= 4 * kv_pairs ({pairs})")
    for key in ("seed", "vocab_size", "batch_size", "test_batch_size", "epochs"):
        if not _is_int(preset[key]) or preset[key] < (0 if key == "seed" else 1):
            raise ValueError(f"preset[{key!r}] must be a positive int, got {preset[key]!r}")
    if not _positive_floats(preset["lrs"]):
        raise ValueError(f"preset['lrs'] must be a non-empty list of positive numbers, got {preset['lrs']!r}")
    if not (isinstance(preset["d_models"], list) and preset["d_models"]
            and all(_is_int(d) and d >= 1 for d in preset["d_models"])):
        raise ValueError(f"preset['d_models'] must be a non-empty list of ints, got {preset['d_models']!r}")
    for key in ("weight_decay", "early_stop"):
        if isinstance(preset[key], bool) or not isinstance(preset[key], (int, float)) or preset[key] < 0:
            raise ValueError(f"preset[{key!r}] must be a number >= 0, got {preset[key]!r}")
    _check_model_config("preset['model']", preset["model"])
    if not isinstance(preset["models"], dict) or not preset["models"]:
        raise ValueError("preset['models'] must be a non-empty dict name -> {'mixer': spec, ...}")
    for name, entry in preset["models"].items():
        if not isinstance(entry, dict) or "mixer" not in entry or set(entry) - MODEL_ENTRY_KEYS:
            raise ValueError(f"model {name!r}: an entry is {{'mixer': spec, 'model': {{...}}, 'lrs': [...]}}, got {entry!r}")
        if "lrs" in entry and not _positive_floats(entry["lrs"]):
            raise ValueError(f"model {name!r}: lrs must be a non-empty list of positive numbers")
        _check_model_config(f"model {name!r}: 'model'", entry.get("model", {}))
    return preset


def _check_model_config(where: str, config) -> None:
    if not isinstance(config, dict) or set(config) - MODEL_CONFIG_KEYS:
        raise ValueError(f"{where} must be a dict with keys among {sorted(MODEL_CONFIG_KEYS)}, got {config!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _positive_floats(xs) -> bool:
    return isinstance(xs, list) and bool(xs) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 and math.isfinite(x) for x in xs)


def describe_cuts(preset: dict) -> list[str]:
    """Where a preset departs from the paper protocol (mostly: runs less of it), one line each."""
    cuts = []
    for key in ("train", "test"):
        paper = {(L, N): n for L, N, n in PAPER[key]}
        ours = {(L, N): n for L, N, n in preset[key]}
        for (L, N), n in paper.items():
            if ours.get((L, N), 0) < n:
                cuts.append(f"{key} (L={L}, N={N}): {ours.get((L, N), 0)} examples instead of {n}")
    for key in ("vocab_size", "epochs", "batch_size"):
        if preset[key] != PAPER[key]:
            cuts.append(f"{key}: {preset[key]} instead of {PAPER[key]}")
    if preset["lrs"] != PAPER["lrs"]:
        cuts.append(f"lrs: {_fmt_lrs(preset['lrs'])} instead of the sweep {_fmt_lrs(PAPER['lrs'])}")
    if preset["d_models"] != PAPER["d_models"]:
        cuts.append(f"d_models: {preset['d_models']} instead of {PAPER['d_models']}")
    return cuts


def _fmt_lrs(lrs) -> str:
    return "[" + ", ".join(f"{lr:.2g}" for lr in lrs) + "]"


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


def make_data(settings: list, vocab_size: int, seed: int, device) -> list[dict]:
    """One segment per ``[seq_len, kv_pairs, examples]``, each with its own seed."""
    segments = []
    for i, (seq_len, pairs, n) in enumerate(settings):
        x, y = generate(n, seq_len, pairs, vocab_size=vocab_size, seed=seed + i)
        segments.append({"seq_len": seq_len, "kv_pairs": pairs, "inputs": x.to(device), "labels": y.to(device)})
    return segments


def setting_name(seq_len: int, kv_pairs: int) -> str:
    return f"L{seq_len}/N{kv_pairs}"


@torch.no_grad()
def evaluate(model, segments: list[dict], batch_size: int) -> dict[str, float]:
    """Accuracy per test setting: per example the fraction of labelled positions predicted
    right, then the mean over examples (spec section 8)."""
    model.eval()
    result = {}
    for seg in segments:
        per_example = []
        for start in range(0, len(seg["inputs"]), batch_size):
            x, y = seg["inputs"][start:start + batch_size], seg["labels"][start:start + batch_size]
            select = y != IGNORE
            correct = (model(x, select).argmax(-1) == y[select]).float()
            rows = select.nonzero()[:, 0]
            hits = torch.zeros(len(x), device=x.device).index_add_(0, rows, correct)
            per_example.append(hits / select.sum(1))
        result[setting_name(seg["seq_len"], seg["kv_pairs"])] = torch.cat(per_example).mean().item()
    return result


def train_run(preset: dict, name: str, d_model: int, lr: float, train_data, test_data, device,
              progress: bool = True) -> dict:
    """Train one (model, d_model, lr) and return its JSONL row."""
    entry = preset["models"][name]
    model_cfg = {**preset["model"], **entry.get("model", {})}
    seed_everything(preset["seed"])
    model = MQARModel(preset["vocab_size"], d_model, entry["mixer"], **model_cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=preset["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=preset["epochs"], eta_min=0.0)
    batches = [(seg, start) for seg in train_data for start in range(0, len(seg["inputs"]), preset["batch_size"])]
    start_time = time.perf_counter()
    bar = tqdm(total=preset["epochs"] * len(batches), desc=f"{name} d={d_model} lr={lr:.2g}", leave=False,
               mininterval=1.0, disable=not progress)
    accuracy, epochs_run = {}, 0
    for epoch in range(preset["epochs"]):
        model.train()
        for seg, start in batches:
            x = seg["inputs"][start:start + preset["batch_size"]]
            y = seg["labels"][start:start + preset["batch_size"]]
            select = y != IGNORE
            loss = F.cross_entropy(model(x, select), y[select])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update()
            if bar.n % 20 == 0:  # loss.item() waits for the GPU: not on every step
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", acc=f"{_avg(accuracy):.3f}" if accuracy else "-")
        accuracy, epochs_run = evaluate(model, test_data, preset["test_batch_size"]), epoch + 1
        if not progress:  # a worker of a parallel sweep has no bar: one line per epoch instead
            print(f"  {name} d_model={d_model} lr={lr:.2g}: epoch {epochs_run}/{preset['epochs']}, avg accuracy "
                  f"{_avg(accuracy):.3f}, {time.perf_counter() - start_time:.0f} s", flush=True)
        if _avg(accuracy) > preset["early_stop"]:
            break
        scheduler.step()
    bar.close()
    max_len = max(L for L, _, _ in preset["test"])
    return {
        "preset": preset.get("name"), "ablation": preset.get("ablation"),
        "model": name, "d_model": d_model, "mixer": entry["mixer"], "model_config": model_cfg,
        "state_size": model.state_size(max_len), "state_seq_len": max_len,
        "params": sum(p.numel() for p in model.parameters()),
        "lr": lr, "epochs_run": epochs_run, "accuracy": accuracy, "avg_accuracy": _avg(accuracy),
        "wall_time_s": round(time.perf_counter() - start_time, 2), "device": device_name(device),
        "git_rev": git_revision(), "seed": preset["seed"], "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _avg(accuracy: dict) -> float:
    return sum(accuracy.values()) / len(accuracy)


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@functools.cache
def git_revision() -> str | None:
    """The commit of the checkout this package runs from (read-only), or None outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def check_models_runnable(preset: dict, device):
    """Fail before any training when a mixer cannot be imported or needs a GPU we lack."""
    for name, entry in preset["models"].items():
        if needs_cuda(entry["mixer"]) and torch.device(device).type != "cuda":
            raise ValueError(f"model {name!r} uses {entry['mixer'].get('name') or entry['mixer'].get('path')}, "
                             f"a flash-linear-attention layer: it needs a CUDA GPU (--device cuda) with "
                             f"'ramnet[baselines]' installed")
        resolve_mixer(entry["mixer"])


class RunsFailed(RuntimeError):
    """Some runs of a sweep failed; ``rows`` holds those that finished (already written)."""

    def __init__(self, rows: list[dict], failures: list[tuple[tuple, BaseException]]):
        self.rows, self.failures = rows, failures
        names = "; ".join(f"{name} d_model={d} lr={lr:.2g} ({type(err).__name__}: {err})"
                          for (d, name, lr), err in failures)
        super().__init__(f"{len(failures)} run(s) failed: {names}")


def run_preset(preset: dict, out_dir: Path, device, log=print, jobs: int = 1) -> list[dict]:
    """Run every (d_model, model, lr) of a preset, appending each row to ``out_dir/results.jsonl``.

    ``jobs > 1`` trains that many runs at once, each in its own process on ``device``: the small
    MQAR models leave most of a GPU idle, so concurrent runs finish a sweep several times sooner.
    Every run is seeded on its own, so its row does not depend on ``jobs``. Raises ``RunsFailed``
    after the last run if any failed."""
    check_preset(preset)
    check_int("jobs", jobs, 1)
    check_models_runnable(preset, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [(d, name, lr) for d in preset["d_models"] for name, entry in preset["models"].items()
            for lr in entry.get("lrs", preset["lrs"])]
    rows = []

    def record(row):
        rows.append(row)
        with open(out_dir / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        log(f"{row['model']} d_model={row['d_model']} lr={row['lr']:.2g}: avg accuracy {row['avg_accuracy']:.3f} "
            f"after {row['epochs_run']} epochs, {row['wall_time_s']:.0f} s")

    # A run that fails (a baseline's kernel refusing an input, a lost GPU) is reported and does not
    # cost the others: their rows are written as they finish, and the failures are raised at the end.
    failures = []

    def settle(run, result):
        """Record the row that ``result()`` returns, or the failure it raises."""
        try:
            record(result())
        except Exception as err:  # noqa: BLE001 - reported with the rows below
            failures.append((run, err))
            log(f"{run[1]} d_model={run[0]} lr={run[2]:.2g}: failed: {type(err).__name__}: {err}")

    if jobs == 1 or len(runs) == 1:
        for run in tqdm(runs, desc="runs", disable=len(runs) == 1):
            settle(run, functools.partial(_train_one, preset, str(device), run))
    else:
        # spawn: CUDA cannot be re-initialised in a forked child.
        context = multiprocessing.get_context("spawn")
        workers = min(jobs, len(runs))
        threads = max(1, torch.get_num_threads() // workers)  # on a CPU device, share the cores
        with ProcessPoolExecutor(workers, mp_context=context, initializer=torch.set_num_threads,
                                 initargs=(threads,)) as pool:
            futures = {pool.submit(_train_one, preset, str(device), run, False): run for run in runs}
            for future in tqdm(as_completed(futures), total=len(futures), desc=f"runs ({jobs} at a time)"):
                settle(futures[future], future.result)
    if failures:
        raise RunsFailed(rows, failures)
    return rows


@functools.lru_cache(maxsize=1)
def _data_for(preset_json: str, device: str):
    preset = json.loads(preset_json)
    seed = preset["seed"]
    # Train and test seeds are disjoint ranges, so no test sequence comes from a train stream.
    return (make_data(preset["train"], preset["vocab_size"], 1000 * seed, device),
            make_data(preset["test"], preset["vocab_size"], 1000 * seed + 500, device))


def _load_data(preset: dict, device: str):
    """The preset's train and test data, generated once per process."""
    return _data_for(json.dumps({k: preset[k] for k in ("seed", "train", "test", "vocab_size")}), device)


def _train_one(preset: dict, device: str, run: tuple, progress: bool = True) -> dict:
    d_model, name, lr = run
    train_data, test_data = _load_data(preset, device)
    return train_run(preset, name, d_model, lr, train_data, test_data, device, progress)


def best_runs(rows: list[dict]) -> list[dict]:
    """The best-lr run of each (preset, model, d_model), in first-seen order."""
    best: dict = {}
    for row in rows:
        key = (row.get("preset"), row["model"], row["d_model"])
        if key not in best or row["avg_accuracy"] > best[key]["avg_accuracy"]:
            best[key] = row
    return list(best.values())


def format_table(rows: list[dict]) -> str:
    """The best-lr result per (model, d_model): state size, lr, average and per-setting accuracy
    (with a preset column when the rows come from several presets)."""
    rows = best_runs(rows)
    settings = list(dict.fromkeys(s for row in rows for s in row["accuracy"]))
    presets = len({r.get("preset") for r in rows}) > 1
    name_w = max(len("model"), *(len(r["model"]) for r in rows))
    preset_w = max(len("preset"), *(len(str(r.get("preset"))) for r in rows))
    head = (f"{'preset':<{preset_w}}  " if presets else "") + f"{'model':<{name_w}}  d_model  {'state':>9}  " \
        f"{'lr':>7}  {'avg':>5}  " + "  ".join(f"{s:>10}" for s in settings)
    lines = [head, "-" * len(head)]
    for r in rows:
        state = "?" if r["state_size"] is None else f"{r['state_size']:,}"
        accs = "  ".join(f"{r['accuracy'][s]:>10.3f}" if s in r["accuracy"] else f"{'-':>10}" for s in settings)
        lines.append((f"{str(r.get('preset')):<{preset_w}}  " if presets else "") + f"{r['model']:<{name_w}}  "
                     f"{r['d_model']:>7}  {state:>9}  {r['lr']:>7.2g}  {r['avg_accuracy']:>5.3f}  {accs}")
    return "\n".join(lines)


def load_rows(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"no results at {path}: run `ramnet mqar` first (or pass --out)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def get_preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return {**copy.deepcopy(PRESETS[name]), "name": name}
