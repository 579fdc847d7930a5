"""The ramnet console script."""

import subprocess
import sys

import ramnet
from ramnet.cli import main


def test_info_prints_version_devices_and_paths(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"ramnet {ramnet.__version__}" in out
    assert "device cpu" in out
    assert "naive, recurrent, parallel" in out


def test_console_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "ramnet.cli", "info"], capture_output=True, text=True, check=True)
    assert "ram_attention paths: naive, recurrent, parallel" in result.stdout
