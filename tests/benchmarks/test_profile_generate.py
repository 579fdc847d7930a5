"""benchmarks/profile_generate.py on the CPU with the tiny model: an eager decoding step's op counts."""

import importlib.util
import sys
from pathlib import Path

import pytest

from ramnet.layers import memories

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load():
    sys.path.insert(0, str(BENCH))  # the script imports bench_generate beside it
    try:
        spec = importlib.util.spec_from_file_location("profile_generate", BENCH / "profile_generate.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_it_reports_a_decoding_steps_ops_per_token(capsys, monkeypatch):
    monkeypatch.setattr(memories, "triton_runs_on", lambda device: False)  # the torch step: fast on the CPU
    _load().main(["--device", "cpu", "--tiny", "--prompt", "8", "--new-tokens", "4", "--rows", "3"])
    out = capsys.readouterr().out
    assert "per decoding step (from 3 steps)" in out
    rows = [line.split() for line in out.splitlines() if " us " in line]
    assert len(rows) == 3  # --rows
    _load().main(["--device", "cpu", "--tiny", "--prompt", "8", "--new-tokens", "4", "--rows", "100"])
    counts = {fields[-1]: float(fields[2]) for fields in (line.split() for line in capsys.readouterr().out.splitlines())
              if len(fields) == 4 and fields[1] == "us"}
    # per token: every layer's projections (2 layers, at least q, k, v, o and the MLP's three) and the head
    assert counts["aten::linear"] >= 2 * 7 + 1


@pytest.mark.parametrize("new_tokens", ["1"])
def test_it_needs_two_tokens_to_measure_a_step(new_tokens):
    with pytest.raises(SystemExit):
        _load().main(["--device", "cpu", "--tiny", "--new-tokens", new_tokens])
