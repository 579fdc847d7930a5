"""MQAR results: the JSONL rows of a sweep, the best-lr run per (model, d_model) and its table."""

from __future__ import annotations

import json
from pathlib import Path


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
    """The rows of a results file: JSONL, one row a line, as ``run_preset`` appends them."""
    if not path.exists():
        raise FileNotFoundError(f"no results at {path}: run `ramnet mqar` first (or pass --out)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
