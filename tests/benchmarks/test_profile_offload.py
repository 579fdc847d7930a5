"""benchmarks/profile_offload.py on the CPU: both states profiled, the times per layer and step parsed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import profile_offload  # noqa: E402


def test_both_states_are_profiled_with_times_per_layer_and_step(capsys):
    assert profile_offload.main(["--smoke", "--batch", "2", "--steps", "2", "--rows", "50"]) == 0
    out = capsys.readouterr().out
    sections = out.split("== ")[1:]
    assert [s.split(",")[0] for s in sections] == ["dense", "offload 0.1"]
    for section in sections:
        rows = [line.split(None, 2) for line in section.splitlines()[1:] if line.strip()]
        names = {name for _, _, name in rows}
        assert "aten::mm" in names  # the projections run in both
        assert all(float(us) > 0 and int(count) >= 0 for us, count, _ in rows)
    # the offloaded state's torch path gathers its rows through the cache: ops the dense step does not have
    assert {r.split(None, 2)[2] for r in sections[1].splitlines()[1:] if r.strip()} - {
        r.split(None, 2)[2] for r in sections[0].splitlines()[1:] if r.strip()}


def test_the_plan_warps_are_the_runs_and_restored_after_it(capsys, monkeypatch):
    from ramnet.states import offload

    monkeypatch.setattr(offload, "PLAN_WARPS", 4)
    assert profile_offload.main(["--smoke", "--batch", "1", "--steps", "1", "--rows", "3", "--plan-warps", "2"]) == 0
    assert "offload 0.1, plan warps 2, host table on cpu" in capsys.readouterr().out
    assert offload.PLAN_WARPS == 4


def test_bad_diagnostic_options_are_refused(capsys):
    import pytest

    for argv in (["--plan-warps", "3"], ["--host-device", "cuda"]):
        with pytest.raises(SystemExit):
            profile_offload.main(["--smoke", *argv])
        assert "--" in capsys.readouterr().err
