"""An MQAR sweep: every (d_model, model, lr) of a preset, one after another or several at once.

Every run is written as one JSONL row as it finishes, with its whole configuration; the reported
result of a run configuration is its lr with the best average accuracy (``ramnet.mqar.report``).
"""

from __future__ import annotations

import functools
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..ops.checks import check_int
from .model import needs_cuda, resolve_mixer
from .presets import MQARPreset, as_preset
from .train import preset_data, train_run


def check_models_runnable(preset: MQARPreset | dict, device) -> None:
    """Fail before any training when a mixer cannot be imported or needs a GPU we lack (``preset``:
    an MQARPreset, or any dict with its ``models``)."""
    models = preset.models if isinstance(preset, MQARPreset) else preset["models"]
    for name, entry in models.items():
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


def run_preset(preset: MQARPreset | dict, out_dir: Path, device, log=print, jobs: int = 1) -> list[dict]:
    """Run every (d_model, model, lr) of a preset, appending each row to ``out_dir/results.jsonl``.

    ``jobs > 1`` trains that many runs at once, each in its own process on ``device``: the small
    MQAR models leave most of a GPU idle, so concurrent runs finish a sweep several times sooner.
    Every run is seeded on its own, so its row does not depend on ``jobs``. Raises ``RunsFailed``
    after the last run if any failed."""
    preset = as_preset(preset)
    check_int("jobs", jobs, 1)
    check_models_runnable(preset, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [(d, name, lr) for d in preset.d_models for name, entry in preset.models.items()
            for lr in entry.get("lrs", preset.lrs)]
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


def _train_one(preset: MQARPreset, device: str, run: tuple, progress: bool = True) -> dict:
    d_model, name, lr = run
    return train_run(preset, name, d_model, lr, *preset_data(preset, device), device, progress)
