"""benchmarks/bench_offload.py writes offload.json in the issue's format; its smoke mode runs on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

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
