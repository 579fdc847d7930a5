"""The ramnet console script."""

import subprocess
import sys

import pytest

import ramnet
from ramnet.cli import main


def test_info_prints_version_devices_and_paths(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"ramnet {ramnet.__version__}" in out
    assert "device cpu" in out
    assert "naive, recurrent, parallel" in out


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_info_lists_the_triton_path_only_where_it_runs(monkeypatch, capsys, interpret):
    from ramnet.ops.triton_support import HAS_TRITON

    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["info"]) == 0
    paths = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("ram_attention paths:"))
    assert paths.endswith("triton") == (HAS_TRITON and interpret == "1")


@pytest.mark.parametrize("module", ["ramnet", "ramnet.cli"])  # python -m ramnet: no install needed
def test_module_entry_points_run(module):
    result = subprocess.run([sys.executable, "-m", module, "info"], capture_output=True, text=True, check=True)
    assert "ram_attention paths: naive, recurrent, parallel" in result.stdout
