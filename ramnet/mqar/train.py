"""One MQAR run (Zoology's protocol): its data, model, training loop and evaluation.

Protocol, as Zoology's trainer: AdamW with weight decay on every parameter, cosine annealing
stepped once per epoch down to 0, no warm-up or clipping; after every epoch the test settings
are evaluated and training stops once the average accuracy exceeds ``early_stop``; the reported
accuracies are those of the last evaluation. Batches never mix settings (their lengths differ).
"""

from __future__ import annotations

import functools
import random
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..provenance import device_name, git_revision
from .data import IGNORE, generate
from .model import MQARModel
from .presets import MQARPreset


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


def preset_data(preset: MQARPreset, device) -> tuple[list[dict], list[dict]]:
    """The preset's train and test segments, generated once per process: every run of a sweep
    trains and tests on the same data."""
    return _cached_data(preset.seed, preset.vocab_size, tuple(map(tuple, preset.train)),
                        tuple(map(tuple, preset.test)), str(device))


@functools.lru_cache(maxsize=1)
def _cached_data(seed: int, vocab_size: int, train: tuple, test: tuple, device: str):
    # Train and test seeds are disjoint ranges, so no test sequence comes from a train stream.
    return (make_data(train, vocab_size, 1000 * seed, device),
            make_data(test, vocab_size, 1000 * seed + 500, device))


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


def train_run(preset: MQARPreset, name: str, d_model: int, lr: float, train_data, test_data, device,
              progress: bool = True) -> dict:
    """Train one (model, d_model, lr) and return its JSONL row."""
    entry = preset.models[name]
    model_cfg = {**preset.model, **entry.get("model", {})}
    seed_everything(preset.seed)
    model = MQARModel(preset.vocab_size, d_model, entry["mixer"], **model_cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=preset.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=preset.epochs, eta_min=0.0)
    batches = [(seg, start) for seg in train_data for start in range(0, len(seg["inputs"]), preset.batch_size)]
    start_time = time.perf_counter()
    bar = tqdm(total=preset.epochs * len(batches), desc=f"{name} d={d_model} lr={lr:.2g}", leave=False,
               mininterval=1.0, disable=not progress)
    accuracy, epochs_run = {}, 0
    for epoch in range(preset.epochs):
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
    bar.close()
    max_len = max(L for L, _, _ in preset.test)
    return {
        "preset": preset.name, "ablation": preset.ablation,
        "model": name, "d_model": d_model, "mixer": entry["mixer"], "model_config": model_cfg,
        "state_size": model.state_size(max_len), "state_seq_len": max_len,
        "params": sum(p.numel() for p in model.parameters()),
        "lr": lr, "protocol": preset.protocol(), "epochs_run": epochs_run, "accuracy": accuracy, "avg_accuracy": _mean_accuracy(accuracy),
        "wall_time_s": round(time.perf_counter() - start_time, 2), "device": device_name(device),
        "git_rev": git_revision(), "seed": preset.seed, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _mean_accuracy(accuracy: dict) -> float:
    return sum(accuracy.values()) / len(accuracy)
