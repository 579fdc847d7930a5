"""An MQAR sweep: every (d_model, model, lr) of a preset, one after another or several at once.

Every run is written as one JSONL row as it finishes, with its whole configuration; the reported
result of a run configuration is its lr with the best average accuracy (``ramnet.mqar.report``).

Sweeps resume: a run whose full configuration (``ramnet.mqar.report.run_key``: preset, model, mixer,
model config, d_model, seed, protocol with its epochs, and lr) is already a row of the results file
is not run again, so a sweep stopped part-way (or on another machine, with the file copied) goes on
where it stopped. A changed configuration is another run. ``resume=False`` runs everything. A run in
progress saves a checkpoint after every epoch (``out_dir/checkpoints/``, named by a hash of its
configuration, removed when its row is written), and a resumed sweep continues such a run from its
last finished epoch (``ramnet.mqar.train.train_run``); ``resume=False`` discards them.

Protocols of the lr sweep:

- ``"full"``: every lr at the preset's epochs (the paper's).
- ``"two-stage"``: every lr at ``screen_epochs`` epochs (stage "screen"); then, per (d_model,
  model), the best of them (``pick_two_stage_lrs``) and its neighbours in the sorted sweep (one at an
  edge) at the preset's epochs (stage "final"). The same cut for every model. A model's final runs
  start as soon as all its screen runs have rows; if one of them failed, its final stage is skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..ops.checks import check_choice, check_int
from .model import needs_cuda, resolve_mixer
from .presets import PROTOCOLS, MQARPreset, as_preset
from .report import load_rows, run_key
from .train import preset_data, run_identity, train_run


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


def pick_two_stage_lrs(lrs: list[float], screen: dict[float, dict]) -> tuple[float, list[float]]:
    """The two-stage protocol's choice for one (d_model, model): ``(best, to_run)``.

    ``screen`` maps each lr of ``lrs`` to its screen row. The best lr has the highest average
    accuracy; of equal ones, the fewest epochs run (it passed the early stop sooner), then the
    smallest lr. ``to_run`` is the best lr and its neighbours in the sorted sweep, ascending: three
    lrs, two at either end of the sweep, one for a sweep of one lr."""
    ordered = sorted(set(lrs))
    missing = [lr for lr in ordered if lr not in screen]
    if missing:
        raise ValueError(f"no screen row for lr {missing}")
    best = min(ordered, key=lambda lr: (-screen[lr]["avg_accuracy"], screen[lr].get("epochs_run") or 0, lr))
    i = ordered.index(best)
    return best, ordered[max(0, i - 1):i + 2]


@dataclasses.dataclass(frozen=True)
class _Run:
    preset: MQARPreset  # with the epochs this run trains for
    d_model: int
    name: str
    lr: float
    stage: str | None

    @property
    def key(self) -> str:
        return run_key(run_identity(self.preset, self.name, self.d_model, self.lr))

    @property
    def checkpoint_name(self) -> str:
        return hashlib.sha1(self.key.encode()).hexdigest()[:20] + ".pt"

    @property
    def label(self) -> tuple:
        return self.d_model, self.name, self.lr


class _Inline:
    """An executor for ``jobs = 1``: a submitted call runs when ``run`` is called on its future, one at a
    time, in the sweep's own process."""

    def __init__(self):
        self._calls: dict = {}

    def submit(self, fn, *args) -> Future:
        future = Future()
        self._calls[future] = (fn, args)
        return future

    def run(self, future: Future) -> None:
        fn, args = self._calls.pop(future)
        try:
            future.set_result(fn(*args))
        except Exception as err:  # noqa: BLE001 - settled by the caller, as a worker's would be
            future.set_exception(err)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_preset(preset: MQARPreset | dict, out_dir: Path, device, log=print, jobs: int = 1, protocol: str = "full",
               screen_epochs: int = 4, resume: bool = True) -> list[dict]:
    """Run a preset's sweep (``protocol``: see the module docstring), appending each row to
    ``out_dir/results.jsonl``; return the rows of the runs made here.

    ``jobs > 1`` trains that many runs at once, each in its own process on ``device``: the small
    MQAR models leave most of a GPU idle, so concurrent runs finish a sweep several times sooner.
    Every run is seeded on its own, so its row does not depend on ``jobs``. With ``resume``, runs
    whose configuration already has a row in the results file are skipped (and count as done for the
    two-stage choice). Raises ``RunsFailed`` after the last run if any failed."""
    preset = as_preset(preset)
    check_int("jobs", jobs, 1)
    check_choice("protocol", protocol, PROTOCOLS)
    if protocol == "two-stage":
        check_int("screen_epochs", screen_epochs, 1)
        if screen_epochs >= preset.epochs:
            raise ValueError(f"the two-stage protocol screens at fewer epochs than it runs: screen_epochs "
                             f"{screen_epochs} must be below the preset's epochs {preset.epochs}")
    check_models_runnable(preset, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "results.jsonl"
    checkpoints = out_dir / "checkpoints"  # of runs in progress: removed when their row is written
    done: dict[str, dict] = {}
    if resume and results.exists():
        done = {run_key(row): row for row in load_rows(results)}  # a re-run's later row wins

    def lrs_of(name):
        return preset.models[name].get("lrs", preset.lrs)

    groups = [(d, name) for d in preset.d_models for name in preset.models]
    if protocol == "two-stage":
        first = dataclasses.replace(preset, epochs=screen_epochs)
        first_runs = [_Run(first, d, name, lr, "screen") for d, name in groups for lr in lrs_of(name)]
    else:
        first_runs = [_Run(preset, d, name, lr, None) for d, name in groups for lr in lrs_of(name)]

    rows, failures = [], []
    skipped = {"screen": 0, "final": 0, None: 0}
    finals_started: set = set()
    bar = tqdm(total=0, desc="runs" if jobs == 1 else f"runs ({jobs} at a time)", disable=len(first_runs) == 1)

    def record(run: _Run, row: dict):
        rows.append(row)
        done[run.key] = row
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        (checkpoints / run.checkpoint_name).unlink(missing_ok=True)
        log(f"{row['model']} d_model={row['d_model']} lr={row['lr']:.2g}"
            + (f" ({run.stage}, {run.preset.epochs} epochs)" if run.stage else "")
            + f": avg accuracy {row['avg_accuracy']:.3f} after {row['epochs_run']} epochs, {row['wall_time_s']:.0f} s")

    def final_stage(pool, futures, d_model, name):
        """Start the final runs of (d_model, name) once each of its screen runs has a row."""
        if protocol != "two-stage" or (d_model, name) in finals_started:
            return
        screen = {run.lr: done.get(run.key) for run in first_runs if (run.d_model, run.name) == (d_model, name)}
        if any(row is None for row in screen.values()):
            return
        finals_started.add((d_model, name))
        best, to_run = pick_two_stage_lrs(list(screen), screen)
        log(f"two-stage: {name} d_model={d_model}: best lr at {screen_epochs} epochs {best:.2g} "
            f"(avg {screen[best]['avg_accuracy']:.3f}); at {preset.epochs} epochs: "
            + ", ".join(f"{lr:.2g}" for lr in to_run))
        start(pool, futures, [_Run(preset, d_model, name, lr, "final") for lr in to_run])

    def start(pool, futures, runs):
        todo = [run for run in runs if run.key not in done]
        skipped[runs[0].stage if runs else None] += len(runs) - len(todo)
        if todo:
            bar.total += len(todo)
            bar.refresh()
        for run in todo:
            checkpoint = checkpoints / run.checkpoint_name
            if not resume:
                checkpoint.unlink(missing_ok=True)
            futures[pool.submit(_train_one, run.preset, str(device), run.label, run.stage, inline, checkpoint)] = run

    # A run that fails (a baseline's kernel refusing an input, a lost GPU) is reported and does not
    # cost the others: their rows are written as they finish, and the failures are raised at the end.
    most = len(first_runs) + (3 * len(groups) if protocol == "two-stage" else 0)
    inline = jobs == 1 or most == 1
    if inline:
        pool = _Inline()
    else:
        # spawn: CUDA cannot be re-initialised in a forked child.
        context = multiprocessing.get_context("spawn")
        workers = min(jobs, most)
        threads = max(1, torch.get_num_threads() // workers)  # on a CPU device, share the cores
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=torch.set_num_threads,
                                   initargs=(threads,))
    with pool:
        futures: dict = {}
        start(pool, futures, first_runs)
        if resume and skipped[first_runs[0].stage]:
            stage = f" {first_runs[0].stage}" if first_runs[0].stage else ""
            log(f"resumed: {skipped[first_runs[0].stage]} of {len(first_runs)}{stage} runs already in {results}, "
                "not run again")
        for d_model, name in groups:
            final_stage(pool, futures, d_model, name)
        while futures:
            if inline:  # one run at a time, in the order submitted
                finished = [next(iter(futures))]
                pool.run(finished[0])
            else:
                finished, _ = wait(list(futures), return_when=FIRST_COMPLETED)
            for future in finished:
                run = futures.pop(future)
                bar.update()
                try:
                    record(run, future.result())
                except Exception as err:  # noqa: BLE001 - reported with the rows below
                    failures.append((run.label, err))
                    log(f"{run.name} d_model={run.d_model} lr={run.lr:.2g}: failed: {type(err).__name__}: {err}")
                if run.stage == "screen":
                    final_stage(pool, futures, run.d_model, run.name)
    bar.close()
    if protocol == "two-stage":
        if skipped["final"]:
            log(f"resumed: {skipped['final']} final runs already in {results}, not run again")
        missing = [f"{name} d_model={d}" for d, name in groups if (d, name) not in finals_started]
        if missing:
            log(f"two-stage: no final stage for {', '.join(missing)}: a screen run failed")
    if failures:
        raise RunsFailed(rows, failures)
    return rows


def _train_one(preset: MQARPreset, device: str, run: tuple, stage: str | None = None, progress: bool = True,
               checkpoint: Path | None = None) -> dict:
    d_model, name, lr = run
    return train_run(preset, name, d_model, lr, *preset_data(preset, device), device, progress, stage=stage,
                     checkpoint=checkpoint)
