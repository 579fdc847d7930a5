"""One MQAR run (Zoology's protocol): its data, model, training loop and evaluation.

Protocol, as Zoology's trainer: AdamW with weight decay on every parameter, cosine annealing
stepped once per epoch down to 0, no warm-up or clipping; after every epoch the test settings
are evaluated and training stops once the average accuracy exceeds ``early_stop``; the reported
accuracies are those of the last evaluation. Batches never mix settings (their lengths differ).
"""

from __future__ import annotations

import functools
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..provenance import device_name, git_revision
from .data import IGNORE, generate
from .model import MQARModel
from .presets import MQARPreset
from .report import run_key


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


def preset_data(preset: MQARPreset, device) -> tuple[list[dict], list[dict]]:
    """The preset's train and test segments, generated once per process: every run of a sweep
    trains and tests on the same data."""
    return _cached_data(preset.seed, preset.vocab_size, tuple(map(tuple, preset.train)),
                        tuple(map(tuple, preset.test)), str(device), preset.reassign)


@functools.lru_cache(maxsize=1)
def _cached_data(seed: int, vocab_size: int, train: tuple, test: tuple, device: str, reassign: float = 0.0):
    # Train and test seeds are disjoint ranges, so no test sequence comes from a train stream.
    return (make_data(train, vocab_size, 1000 * seed, device, reassign),
            make_data(test, vocab_size, 1000 * seed + 500, device, reassign))


def make_data(settings: list, vocab_size: int, seed: int, device, reassign: float = 0.0) -> list[dict]:
    """One segment per ``[seq_len, kv_pairs, examples]``, each with its own seed (``reassign``: the
    forgetting variant, ``ramnet.mqar.data.generate``)."""
    segments = []
    for i, (seq_len, pairs, n) in enumerate(settings):
        x, y = generate(n, seq_len, pairs, vocab_size=vocab_size, seed=seed + i, reassign=reassign)
        segments.append({"seq_len": seq_len, "kv_pairs": pairs, "inputs": x.to(device), "labels": y.to(device)})
    return segments


def setting_name(seq_len: int, kv_pairs: int) -> str:
    return f"L{seq_len}/N{kv_pairs}"


@torch.no_grad()
def evaluate(model, segments: list[dict], batch_size: int) -> dict[str, float]:
    """Accuracy per test setting: per example the fraction of labelled positions predicted
    right, then the mean over examples (as Zoology)."""
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


def run_identity(preset: MQARPreset, name: str, d_model: int, lr: float) -> dict:
    """The fields of a run's row that define the run (``ramnet.mqar.report.run_key``), known before it
    runs: a sweep skips a run whose identity a results file already holds."""
    entry = preset.models[name]
    return {"preset": preset.name, "ablation": preset.ablation, "model": name, "d_model": d_model,
            "mixer": entry["mixer"], "model_config": {**preset.model, **entry.get("model", {})},
            "lr": lr, "protocol": preset.protocol(), "seed": preset.seed}


def train_run(preset: MQARPreset, name: str, d_model: int, lr: float, train_data, test_data, device,
              progress: bool = True, stage: str | None = None, checkpoint: Path | None = None) -> dict:
    """Train one (model, d_model, lr) and return its JSONL row. ``stage``: "screen" or "final" for the
    runs of the two-stage protocol (``ramnet.mqar.sweep``), stored with the row; None otherwise.

    ``checkpoint``: a file where the run's state (model, optimizer, schedule, RNG, last evaluation,
    time so far) is saved after every epoch that does not end it. If the file holds a checkpoint of
    this run (``run_key``), training goes on from it: a run stopped part-way loses at most its
    current epoch, and on the same device ends as it would have uninterrupted. The caller removes
    the file once the row is written."""
    entry = preset.models[name]
    identity = run_identity(preset, name, d_model, lr)
    model_cfg = identity["model_config"]
    seed_everything(preset.seed)
    model = MQARModel(preset.vocab_size, d_model, entry["mixer"], **model_cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=preset.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=preset.epochs, eta_min=0.0)
    batches = [(seg, start) for seg in train_data for start in range(0, len(seg["inputs"]), preset.batch_size)]
    key = run_key(identity)
    accuracy, epochs_run, before = {}, 0, 0.0
    if checkpoint is not None and Path(checkpoint).exists():
        # on the CPU: the RNG states must stay there; load_state_dict moves the rest to the model's device
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if state.get("run_key") == key:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            if state.get("cuda_rng") is not None and torch.device(device).type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"], torch.device(device))
            accuracy, epochs_run, before = state["accuracy"], state["epochs_run"], state["wall_time_s"]
            print(f"  {name} d_model={d_model} lr={lr:.2g}: resumed after epoch {epochs_run} from {checkpoint}",
                  flush=True)
    start_time = time.perf_counter() - before
    bar = tqdm(total=preset.epochs * len(batches), initial=epochs_run * len(batches),
               desc=f"{name} d={d_model} lr={lr:.2g}", leave=False, mininterval=1.0, disable=not progress)
    for epoch in range(epochs_run, preset.epochs):
        model.train()
        for seg, start in batches:
            x = seg["inputs"][start:start + preset.batch_size]
            y = seg["labels"][start:start + preset.batch_size]
            select = y != IGNORE
            loss = F.cross_entropy(model(x, select), y[select])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update()
            if bar.n % 20 == 0:  # loss.item() waits for the GPU: not on every step
                acc = f"{_mean_accuracy(accuracy):.3f}" if accuracy else "-"
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", acc=acc)
        accuracy, epochs_run = evaluate(model, test_data, preset.test_batch_size), epoch + 1
        if not progress:  # a worker of a parallel sweep has no bar: one line per epoch instead
            print(f"  {name} d_model={d_model} lr={lr:.2g}: epoch {epochs_run}/{preset.epochs}, avg accuracy "
                  f"{_mean_accuracy(accuracy):.3f}, {time.perf_counter() - start_time:.0f} s", flush=True)
        if _mean_accuracy(accuracy) > preset.early_stop:
            break
        scheduler.step()
        if checkpoint is not None and epochs_run < preset.epochs:
            _save_checkpoint(Path(checkpoint), {
                "run_key": key, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(torch.device(device)) if torch.device(device).type == "cuda"
                else None, "accuracy": accuracy, "epochs_run": epochs_run,
                "wall_time_s": time.perf_counter() - start_time})
    bar.close()
    max_len = max(L for L, _, _ in preset.test)
    return {
        "preset": identity["preset"], "ablation": identity["ablation"],
        "model": name, "d_model": d_model, "mixer": identity["mixer"], "model_config": model_cfg,
        "state_size": model.state_size(max_len), "state_seq_len": max_len,
        "params": sum(p.numel() for p in model.parameters()),
        "lr": lr, "protocol": identity["protocol"], "stage": stage, "epochs_run": epochs_run, "accuracy": accuracy,
        "avg_accuracy": _mean_accuracy(accuracy),
        "wall_time_s": round(time.perf_counter() - start_time, 2), "device": device_name(device),
        "git_rev": git_revision(), "seed": identity["seed"], "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` through a temporary file, so a stop mid-write leaves the last one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _mean_accuracy(accuracy: dict) -> float:
    return sum(accuracy.values()) / len(accuracy)
