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


def shown_rows(rows: list[dict]) -> list[dict]:
    """``rows`` without the two-stage protocol's screen runs of each (preset, model, d_model) that has
    final runs: once a model's lrs have run at the full epochs, its short screen runs are not its
    result (they stay in the results file, and ``format_table(rows)`` shows them on demand)."""
    finals = {(r.get("preset"), r["model"], r["d_model"]) for r in rows if r.get("stage") == "final"}
    return [r for r in rows
            if not (r.get("stage") == "screen" and (r.get("preset"), r["model"], r["d_model"]) in finals)]


def pareto_frontier(points: list, state=lambda p: p["state_size"], accuracy=lambda p: p["avg_accuracy"]) -> list:
    """The points of ``points`` that no other point beats: none has a state as small or smaller and an
    accuracy as high or higher, one of the two strictly. Ascending in state (so strictly ascending in
    accuracy); of points equal in both, the first. Points with an unknown (None) state are left out.
    ``state`` / ``accuracy`` read a point (defaults: a result row)."""
    known = sorted((p for p in points if state(p) is not None), key=lambda p: (state(p), -accuracy(p)))
    frontier = []
    for p in known:  # by state ascending, the best accuracy first among equal states
        if not frontier or accuracy(p) > accuracy(frontier[-1]):
            frontier.append(p)
    return frontier


# The mixer kwargs that set a model's size along its line of the frontier figure: RAM-Net's U (M =
# d_p^U slots at a fixed partition size) and Raven's slots.
SIZE_KWARGS = ("num_partitions", "num_slots")


def model_families(rows: list[dict]) -> dict[str, str]:
    """The line of each row (by ``run_group``) in the frontier figure, as its label: rows whose mixer
    and model config are equal but for ``SIZE_KWARGS`` are one family, so RAM-Net at M = 16 ... 4096
    is one line through its configurations while RAM-Net with K 16 is another. The label is the
    words that the family's model names begin with ("ramnet M=16", "ramnet" -> "ramnet"), with the
    kwargs that tell apart families that would share a label ("ramnet (partition_dim=16)")."""
    def family(row):
        mixer = row.get("mixer") or {}
        kwargs = {k: v for k, v in (mixer.get("kwargs") or {}).items() if k not in SIZE_KWARGS}
        return json.dumps({**mixer, "kwargs": kwargs, "model_config": row.get("model_config")}, sort_keys=True)

    names: dict = {}
    for row in rows:
        names.setdefault(family(row), []).append(row["model"].split())
    label = {}
    for key, words in names.items():
        prefix = []
        for column in zip(*words):
            if len(set(column)) > 1:
                break
            prefix.append(column[0])
        label[key] = " ".join(prefix) or " ".join(words[0])
    for shared in {lab for lab in label.values() if list(label.values()).count(lab) > 1}:
        keys = [k for k in label if label[k] == shared]
        kwargs = {k: json.loads(k)["kwargs"] for k in keys}
        differ = sorted({name for kw in kwargs.values() for name in kw
                         if len({json.dumps(other.get(name)) for other in kwargs.values()}) > 1})
        for k in keys:
            extra = ", ".join(f"{name}={kwargs[k].get(name)}" for name in differ)
            tag = extra or f"config {hashlib.sha1(k.encode()).hexdigest()[:6]}"
            label[k] = f"{shared} ({tag})"
    return {run_group(row): label[family(row)] for row in rows}


def markdown_table(rows: list[dict]) -> str:
    """The best-lr result per run configuration as a Markdown table ascending in state size, one per
    d_model within it, with the Pareto frontier of each d_model (``pareto_frontier``) in bold and
    marked *."""
    best = best_runs(shown_rows(rows))
    settings = list(dict.fromkeys(s for row in best for s in row["accuracy"]))
    on_front = {id(r) for d in {r["d_model"] for r in best}
                for r in pareto_frontier([r for r in best if r["d_model"] == d])}
    head = ["model", "d_model", "state", "lr", "epochs", "avg", *settings]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(best, key=lambda r: (r["state_size"] is None, r["state_size"] or 0, r["model"])):
        front = id(r) in on_front
        state = "?" if r["state_size"] is None else f"{r['state_size']:,}"
        avg = f"**{r['avg_accuracy']:.3f}** *" if front else f"{r['avg_accuracy']:.3f}"
        ran = f"{r.get('epochs_run', '?')}/{epochs(r) if epochs(r) is not None else '?'}"
        accs = [f"{r['accuracy'][s]:.2f}" if s in r["accuracy"] else "-" for s in settings]
        cells = [r["model"], str(r["d_model"]), state, f"{r['lr']:.2g}", ran, avg, *accs]
        lines.append("| " + " | ".join(cells) + " |")
    return ("\n".join(lines) + "\n\n\\* on the Pareto frontier of its d_model: no result with a state as small has "
            "as high an accuracy\n")
