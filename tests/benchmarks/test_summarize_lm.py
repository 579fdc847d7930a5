"""benchmarks/summarize_lm.py reads the last run of a metrics file and summarises it."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "summarize_lm.py"
spec = importlib.util.spec_from_file_location("summarize_lm", SCRIPT)
summarize_lm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summarize_lm)


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_rows(steps, ppl_scale=1.0):
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "tokens": 100 * step, "train/loss": 5.0 - step / 10}
        if step % 2 == 0:
            row.update({"train/tokens_per_s": [999.0, 10.0, 30.0, 20.0][step // 2 - 1], "train/peak_memory_gib": step / 10})
        if step % 4 == 0:
            row.update({"val/loss": 1.0, "val/ppl": ppl_scale * 40.0 / step})
        rows.append(row)
    return rows


def test_an_abandoned_first_run_is_skipped_and_the_summary_is_the_last_runs(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write(path, run_rows(6, ppl_scale=100.0) + run_rows(8))  # a killed run, then a fresh one
    s = summarize_lm.summarize(summarize_lm.last_run(path))
    assert s["steps"] == 8 and s["tokens"] == 800
    assert s["evals"] == [(400, 10.0), (800, 5.0)] and s["final_ppl"] == 5.0 == s["best_ppl"]
    assert s["tokens_per_s"] == 20.0  # median of 10, 30, 20: the first interval (999, compiling) left out
    assert s["peak_memory_gib"] == 0.8


def test_cli_writes_table_and_plot(tmp_path, capsys):
    write(tmp_path / "a.jsonl", run_rows(8))
    write(tmp_path / "b.jsonl", run_rows(8, ppl_scale=2.0))
    stem = tmp_path / "out" / "cmp"
    assert summarize_lm.main([f"A={tmp_path / 'a.jsonl'}", f"B={tmp_path / 'b.jsonl'}", "--out", str(stem)]) == 0
    md = stem.with_suffix(".md").read_text()
    assert "| A | 8 | 800 | 5.00 | 5.00 | 20 | 0.80 |" in md and "| B | 8 | 800 | 10.00 |" in md
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        summarize_lm.main(["no-equals-sign", "--out", str(stem)])
