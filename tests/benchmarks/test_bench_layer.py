"""benchmarks/bench_layer.py: the CPU run writes both files, and ``--ram-modes`` names the PDMA kernels."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_layer.py"
sys.path.insert(0, str(SCRIPT.parent))

from bench_layer import ram_mode, ram_name  # noqa: E402


def test_ram_modes_name_the_kernels_and_reject_what_they_cannot_run():
    assert ram_mode("parallel") == ("parallel", "auto")
    assert ram_mode("triton/token") == ("triton", "token")
    assert ram_name("triton/sorted") == "ram_triton_sorted"
    for bad in ("triton/fast", "triton/chunked", "parallel/token"):
        with pytest.raises(ValueError, match="--ram-modes"):
            ram_mode(bad)


def test_cpu_run_writes_json_and_markdown(tmp_path):
    out = tmp_path / "layer.json"
    subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--ram-modes", "parallel", "--seq-lens", "64",
                    "--time-segments", "2", "--repeats", "1", "--out", str(out)], check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert {"device", "torch", "git_rev"} <= result["meta"].keys()
    timed = {(r["kind"], r["name"], r["pass"]) for r in result["rows"] if r["ms"]}
    assert {("layer", "ram_parallel", "fwd+bwd"), ("layer", "attention", "fwd+bwd"), ("op", "ram_parallel", "fwd"),
            ("op", "ram_parallel_seg2", "fwd+bwd")} <= timed
    assert "| ram_parallel | 64 |" in out.with_suffix(".md").read_text()
