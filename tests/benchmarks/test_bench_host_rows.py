"""benchmarks/bench_host_rows.py on the CPU (the interpreter): every layout's gathered rows are checked against
torch's indexing before they are timed, and the results are written."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import bench_host_rows  # noqa: E402


@pytest.mark.parametrize("stride", [65, 72, 128])
def test_the_kernel_gathers_the_first_width_values_of_each_row(stride):
    src = torch.randn(40, stride)
    index = torch.tensor([3, 39, 0, 3, 17, 5, 8])  # a repeated row, the first and the last; 7 rows: a ragged program
    dst = torch.empty(len(index), bench_host_rows.WIDTH)
    bench_host_rows.gather(src, index, dst, rows_per_program=4)
    assert torch.equal(dst, src[index, : bench_host_rows.WIDTH])


def test_the_quick_run_writes_json_and_markdown(tmp_path):
    out = tmp_path / "rows.json"
    assert bench_host_rows.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["meta"]["width"] == 65 and result["meta"]["git_rev"]
    assert [(r["stride"], r["rows_per_program"]) for r in result["rows"]] == [(65, 4), (72, 4)]
    assert all(r["us"] > 0 and r["gb_s"] > 0 for r in result["rows"])
    assert "| gather | 8 | 72 | 4 |" in out.with_suffix(".md").read_text()
