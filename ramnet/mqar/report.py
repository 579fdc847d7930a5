"""MQAR results: the JSONL rows of a sweep, the best-lr run per run configuration and its table.

A row is one run. Its *run configuration* is everything that defines it: the preset's name, the
model's name, mixer and model config, d_model, lr, seed and the protocol (vocabulary, train and test
settings, batches, epochs, weight decay, early stop). Rows with the same configuration are re-runs
of one run: the latest one counts. Rows whose configurations differ in anything but the lr are
different results, never merged: the table and the figures show each with its best lr.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# What defines a run besides its lr (``run_group``). Rows written before the protocol and the
# preset's epochs were stored lack those keys: they read as None, so such rows group only by
# what they do record.
GROUP_FIELDS = ("preset", "ablation", "model", "mixer", "model_config", "d_model", "seed", "protocol")


def run_group(row: dict) -> str:
    """The run configuration of ``row`` without its lr, as a canonical JSON string."""
    return json.dumps({key: row.get(key) for key in GROUP_FIELDS}, sort_keys=True)


def run_key(row: dict) -> str:
    """The full run configuration of ``row``: its group and its lr."""
    return json.dumps([run_group(row), row.get("lr")])


def epochs(row: dict) -> int | None:
    """The epochs a row's run was given (its protocol's), or None for rows that do not record it."""
    return (row.get("protocol") or {}).get("epochs")


def best_runs(rows: list[dict]) -> list[dict]:
    """The best-lr run of each run configuration (``run_group``), in first-seen order; of rows with
    the same full configuration (``run_key``: re-runs), the latest."""
    latest = {run_key(row): row for row in rows}  # a dict keeps the first-seen order of its keys
    best: dict = {}
    for row in latest.values():
        group = run_group(row)
        if group not in best or row["avg_accuracy"] > best[group]["avg_accuracy"]:
            best[group] = row
    return list(best.values())


def variant_labels(rows: list[dict], across_d_models: bool = False) -> dict[str, str]:
    """A short label per run group (``run_group``) of ``rows`` that tells apart the configurations of
    one (preset, model, d_model), or of one (preset, model) over all its d_models with
    ``across_d_models`` (a figure's line): their epochs and seed, and a hash of their configuration
    when those are equal too. The label is empty where there is one configuration."""
    def ident(row):
        return run_group({**row, "d_model": None}) if across_d_models else run_group(row)

    by_point: dict = {}
    for row in rows:
        point = (row.get("preset"), row["model"], None if across_d_models else row["d_model"])
        by_point.setdefault(point, {})[ident(row)] = row
    labels = {}
    for variants in by_point.values():
        shown = {key: _epochs_seed(row) for key, row in variants.items()}
        for key in variants:
            if len(variants) == 1:
                labels[key] = ""
            elif list(shown.values()).count(shown[key]) == 1:
                labels[key] = shown[key]
            else:
                labels[key] = f"{shown[key]}, config {config_hash(variants[key])}"
    return {run_group(row): labels[ident(row)] for row in rows}


def config_hash(row: dict) -> str:
    """Six hex digits of ``row``'s run configuration without its lr and d_model: the same for the
    points of one line of the figure and for its rows in the table."""
    return hashlib.sha1(run_group({**row, "d_model": None}).encode()).hexdigest()[:6]


def _epochs_seed(row: dict) -> str:
    n = epochs(row)
    return f"{'?' if n is None else n} epoch{'' if n == 1 else 's'}, seed {row.get('seed', '?')}"


def format_table(rows: list[dict]) -> str:
    """The best-lr result per run configuration: state size, lr, epochs (run / given), seed, average
    and per-setting accuracy (with a preset column when the rows come from several presets, and a
    config column when two configurations of one model and d_model share epochs and seed)."""
    rows = best_runs(rows)
    settings = list(dict.fromkeys(s for row in rows for s in row["accuracy"]))
    presets = len({r.get("preset") for r in rows}) > 1
    hashes = {run_group(r): label.partition("config ")[2] for r, label in
              ((r, variant_labels(rows)[run_group(r)]) for r in rows)}
    configs = any(hashes.values())
    name_w = max(len("model"), *(len(r["model"]) for r in rows))
    preset_w = max(len("preset"), *(len(str(r.get("preset"))) for r in rows))
    head = (f"{'preset':<{preset_w}}  " if presets else "") + f"{'model':<{name_w}}  " + \
        ("config  " if configs else "") + f"d_model  {'state':>9}  {'lr':>7}  {'epochs':>6}  {'seed':>4}  " \
        f"{'avg':>5}  " + "  ".join(f"{s:>10}" for s in settings)
    lines = [head, "-" * len(head)]
    for r in rows:
        state = "?" if r["state_size"] is None else f"{r['state_size']:,}"
        ran = f"{r.get('epochs_run', '?')}/{epochs(r) if epochs(r) is not None else '?'}"
        accs = "  ".join(f"{r['accuracy'][s]:>10.3f}" if s in r["accuracy"] else f"{'-':>10}" for s in settings)
        lines.append((f"{str(r.get('preset')):<{preset_w}}  " if presets else "") + f"{r['model']:<{name_w}}  "
                     + (f"{hashes[run_group(r)]:<6}  " if configs else "") +
                     f"{r['d_model']:>7}  {state:>9}  {r['lr']:>7.2g}  {ran:>6}  {str(r.get('seed', '?')):>4}  "
                     f"{r['avg_accuracy']:>5.3f}  {accs}")
    return "\n".join(lines)


def load_rows(path: Path) -> list[dict]:
    """The rows of a results file: JSONL, one row a line, as ``run_preset`` appends them."""
    if not path.exists():
        raise FileNotFoundError(f"no results at {path}: run `ramnet mqar` first (or pass --out)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
