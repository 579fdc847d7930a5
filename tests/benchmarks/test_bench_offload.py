"""benchmarks/bench_offload.py writes offload.json in the issue's format; its smoke mode runs on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_offload.py"


def test_smoke_run_writes_meta_and_rows_with_identical_tokens(tmp_path):
    out = tmp_path / "offload.json"
    subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--memory", "64", "--batch", "2", "--context", "16", "4096",
                    "--warmup", "2", "--steps", "3", "--budgets", "0.1", "0.25", "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert {"device", "torch", "git_rev"} <= result["meta"].keys()
    rows = result["rows"]
    assert [(r["state"], r["budget"]) for r in rows[:4]] == [("dense", None), ("sparse", None), ("offload", 0.1),
                                                            ("offload", 0.25)]
    for row in rows:
        assert {"state", "budget", "B", "context", "M", "tok_s", "gpu_state_fraction", "hit_rate"} <= row.keys()
        assert row["tok_s"] > 0 and row["tokens_match"] is True, row
        if row["state"] == "offload":
            assert 0 <= row["hit_rate"] <= 1 and row["gpu_state_fraction"] <= row["budget"] + 0.01


def test_rows_are_written_as_they_come_and_resume_runs_only_the_missing_cases(tmp_path):
    out = tmp_path / "offload.json"
    base = [sys.executable, str(SCRIPT), "--smoke", "--memory", "64", "--batch", "1", "--warmup", "1", "--steps", "2",
            "--budgets", "0.25", "--out", str(out)]
    subprocess.run(base + ["--context", "16"], check=True, capture_output=True, timeout=300)
    first = json.loads(out.read_text())["rows"]
    assert [(r["state"], r["context"]) for r in first] == [("dense", 16), ("sparse", 16), ("offload", 16)]
    assert "| offload | 0.25 | 1 | 16 | 64 |" in out.with_suffix(".md").read_text()
    # A second context: the first context's rows are kept as they were (not measured again), the new ones added.
    subprocess.run(base + ["--context", "16", "32", "--resume"], check=True, capture_output=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert rows[:3] == first and [(r["state"], r["context"]) for r in rows[3:]] == [
        ("dense", 32), ("sparse", 32), ("offload", 32)]
    assert all(r["tokens_match"] in (True, None) for r in rows)
    # A file of other settings is refused, not mixed in.
    done = subprocess.run(base + ["--context", "16", "--steps", "3", "--resume"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0 and "steps" in done.stderr


def test_graph_mode_needs_cuda_and_says_so(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--graph", "--out", str(tmp_path / "o.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--graph" in done.stderr and "cuda" in done.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_mode_replays_the_dense_and_offloaded_steps_with_the_dense_tokens(tmp_path):
    # The timed steps are replays of one captured step: the host-resident state's tokens must still be the
    # dense state's (the same captured arithmetic); the sparse state, which cannot be captured, runs eagerly.
    out = tmp_path / "offload.json"
    subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--device", "cuda", "--graph", "--memory", "64",
                    "--batch", "2", "--context", "4096", "--warmup", "2", "--steps", "6", "--budgets", "0.1",
                    "--out", str(out)], check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["meta"]["mode"] == "graph"
    rows = {r["state"]: r for r in result["rows"]}
    assert [rows[kind]["mode"] for kind in ("dense", "sparse", "offload")] == ["graph", "eager", "graph"]
    assert rows["sparse"]["tokens_reference"] == "dense, eager"
    for kind in ("dense", "sparse", "offload"):
        assert rows[kind]["tok_s"] > 0 and rows[kind]["tokens_match"] is True, rows[kind]
    assert "eager steps" in out.with_suffix(".md").read_text()
