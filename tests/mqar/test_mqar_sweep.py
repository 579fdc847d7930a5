"""Sweeps resume from their results file, and the two-stage lr protocol: its choice of lrs, its cut
as printed, and its runs end to end on a tiny preset."""

import copy
import json

import pytest

from ramnet.cli import main
from ramnet.mqar.presets import PRESETS, MQARPreset, describe_cuts
from ramnet.mqar.report import run_key
from ramnet.mqar.sweep import pick_two_stage_lrs, run_preset
from ramnet.mqar.train import run_identity

LRS = [1e-3, 10 ** -2.5, 1e-2, 10 ** -1.5]


def _tiny(models=("attention", "sliding_window"), lrs=(1e-3, 3e-3), epochs=2, d_models=(16,)):
    """The quick preset shrunk to seconds: two CPU baselines, two lrs."""
    preset = copy.deepcopy(PRESETS["quick"])
    preset.update(vocab_size=64, train=[[16, 2, 32]], test=[[16, 2, 8], [32, 4, 8]], batch_size=16,
                  test_batch_size=8, epochs=epochs, lrs=list(lrs), d_models=list(d_models), name="tiny")
    preset["models"] = {m: preset["models"][m] for m in models}
    return preset


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _screen(*accs, epochs_run=None):
    """Screen rows of LRS with these average accuracies (and epochs run)."""
    epochs_run = epochs_run or [4] * len(accs)
    return {lr: {"avg_accuracy": a, "epochs_run": e} for lr, a, e in zip(LRS, accs, epochs_run)}


# --- the two-stage choice ------------------------------------------------------------------------

@pytest.mark.parametrize("accs,best,to_run", [
    ((0.2, 0.5, 0.9, 0.4), 2, [1, 2, 3]),  # inside the sweep: the best and both neighbours
    ((0.9, 0.5, 0.3, 0.1), 0, [0, 1]),  # the smallest lr: one neighbour
    ((0.1, 0.3, 0.5, 0.9), 3, [2, 3]),  # the largest lr: one neighbour
    ((0.2, 0.8, 0.8, 0.1), 1, [0, 1, 2]),  # a tie, equal epochs: the smaller lr
])
def test_two_stage_picks_the_best_lr_and_its_neighbours(accs, best, to_run):
    got_best, got_run = pick_two_stage_lrs(LRS, _screen(*accs))
    assert got_best == LRS[best] and got_run == [LRS[i] for i in to_run]


def test_two_stage_ties_go_to_the_run_that_stopped_sooner_and_the_order_of_lrs_does_not_matter():
    screen = _screen(0.995, 0.995, 0.4, 0.2, epochs_run=[3, 2, 4, 4])
    assert pick_two_stage_lrs(LRS, screen) == (LRS[1], LRS[:3])
    assert pick_two_stage_lrs(list(reversed(LRS)), screen) == (LRS[1], LRS[:3])
    assert pick_two_stage_lrs([3e-3], {3e-3: {"avg_accuracy": 0.5, "epochs_run": 4}}) == (3e-3, [3e-3])
    with pytest.raises(ValueError, match="no screen row"):
        pick_two_stage_lrs(LRS, {LRS[0]: {"avg_accuracy": 0.5}})


def test_the_two_stage_cut_is_printed():
    cuts = describe_cuts(PRESETS["paper"], "two-stage", 4)
    assert cuts == ["lr sweep in two stages, for every model alike: each lr of the sweep at 4 epochs, then the "
                    "best of them (and its neighbours in the sweep) at 32 epochs, instead of every lr at 32"]
    assert describe_cuts(PRESETS["paper"]) == []


# --- resuming ------------------------------------------------------------------------------------

def test_a_stopped_sweep_runs_only_its_missing_runs(tmp_path):
    preset = MQARPreset.from_dict(_tiny())
    out = tmp_path / "res"
    full = run_preset(preset, tmp_path / "all", "cpu", log=lambda _: None)
    assert len(full) == 4
    # "stopped" after two runs: the file holds their rows (here: copied from the full sweep)
    out.mkdir()
    (out / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in full[:2]))
    log = []
    new = run_preset(preset, out, "cpu", log=log.append)
    assert [(r["model"], r["lr"]) for r in new] == [(r["model"], r["lr"]) for r in full[2:]]
    assert "resumed: 2 of 4 runs already in" in "\n".join(log)
    rows = _rows(out / "results.jsonl")
    assert len(rows) == 4 and {run_key(r) for r in rows} == {run_key(r) for r in full}
    for a, b in zip(rows[2:], full[2:]):  # the continued runs are the runs the full sweep made
        assert a["accuracy"] == b["accuracy"]
    assert run_preset(preset, out, "cpu", log=lambda _: None) == []  # nothing left to run
    assert len(run_preset(preset, out, "cpu", log=lambda _: None, resume=False)) == 4  # --rerun
    assert len(_rows(out / "results.jsonl")) == 8


@pytest.mark.parametrize("change", [
    lambda p: p["models"]["attention"]["mixer"]["kwargs"].update(num_heads=2),  # the model's config
    lambda p: p.update(epochs=3),  # the protocol's epochs
    lambda p: p.update(test=[[16, 2, 8], [32, 4, 16]]),  # the protocol's data
    lambda p: p.update(seed=1),
    lambda p: p.update(name="other"),
])
def test_a_changed_configuration_runs_again(tmp_path, change):
    preset = _tiny(models=("attention",), lrs=(1e-3,))
    run_preset(preset, tmp_path, "cpu", log=lambda _: None)
    changed = copy.deepcopy(preset)
    change(changed)
    assert len(run_preset(changed, tmp_path, "cpu", log=lambda _: None)) == 1
    assert run_preset(changed, tmp_path, "cpu", log=lambda _: None) == []


def test_a_row_matches_the_identity_its_run_is_skipped_by(tmp_path):
    preset = MQARPreset.from_dict(_tiny(models=("attention",), lrs=(1e-3,)))
    (row,) = run_preset(preset, tmp_path, "cpu", log=lambda _: None)
    stored = _rows(tmp_path / "results.jsonl")[0]  # through JSON, as a later sweep reads it
    assert run_key(stored) == run_key(row) == run_key(run_identity(preset, "attention", 16, 1e-3))
    assert {"epochs_run", "device", "git_rev", "stage"} <= set(stored)


# --- the two-stage protocol end to end -----------------------------------------------------------

def test_two_stage_screens_every_lr_then_runs_the_best_and_its_neighbours(tmp_path):
    preset = _tiny(lrs=(1e-3, 3e-3, 1e-2), epochs=3)
    log = []
    rows = run_preset(preset, tmp_path, "cpu", log=log.append, protocol="two-stage", screen_epochs=1)
    screen = [r for r in rows if r["stage"] == "screen"]
    final = [r for r in rows if r["stage"] == "final"]
    assert len(screen) == 6 and {r["protocol"]["epochs"] for r in screen} == {1}
    assert {r["protocol"]["epochs"] for r in final} == {3}
    for model in ("attention", "sliding_window"):
        by_lr = {r["lr"]: r for r in screen if r["model"] == model}
        best, to_run = pick_two_stage_lrs(list(by_lr), by_lr)
        assert sorted(r["lr"] for r in final if r["model"] == model) == to_run
        assert any(f"two-stage: {model} d_model=16: best lr at 1 epochs {best:.2g}" in line for line in log)
    # resumed, nothing is left; stopped after the screen, only the final runs are left
    assert run_preset(preset, tmp_path, "cpu", log=lambda _: None, protocol="two-stage", screen_epochs=1) == []
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in screen))
    again = run_preset(preset, tmp_path, "cpu", log=log.append, protocol="two-stage", screen_epochs=1)
    assert sorted((r["model"], r["lr"]) for r in again) == sorted((r["model"], r["lr"]) for r in final)
    assert all(r["stage"] == "final" for r in again)
    assert "resumed: 6 of 6 screen runs already in" in "\n".join(log)


def test_two_stage_reuses_a_plain_run_of_the_same_configuration(tmp_path):
    # a screen run is the run of the same preset at the screen's epochs: a plain 1-epoch sweep's rows count
    preset = _tiny(models=("attention",), lrs=(1e-3, 3e-3), epochs=3)
    run_preset({**preset, "epochs": 1}, tmp_path, "cpu", log=lambda _: None)
    rows = run_preset(preset, tmp_path, "cpu", log=lambda _: None, protocol="two-stage", screen_epochs=1)
    assert [r["stage"] for r in rows] == ["final", "final"]


def test_two_stage_without_its_screen_rows_runs_no_final_stage(tmp_path):
    preset = _tiny(lrs=(1e-3, 3e-3), epochs=3)
    preset["models"]["broken"] = {"mixer": {"name": "attention", "kwargs": {"num_heads": 3}}}  # 16 over 3 heads
    log = []
    with pytest.raises(RuntimeError, match="2 run\\(s\\) failed: broken"):
        run_preset(preset, tmp_path, "cpu", log=log.append, protocol="two-stage", screen_epochs=1)
    rows = _rows(tmp_path / "results.jsonl")
    assert sorted({(r["model"], r["stage"]) for r in rows}) == [
        ("attention", "final"), ("attention", "screen"), ("sliding_window", "final"), ("sliding_window", "screen")]
    assert "two-stage: no final stage for broken d_model=16" in "\n".join(log)


def test_two_stage_checks_its_epochs(tmp_path):
    with pytest.raises(ValueError, match="screen_epochs 4 must be below the preset's epochs 2"):
        run_preset(_tiny(), tmp_path, "cpu", protocol="two-stage", screen_epochs=4)
    with pytest.raises(ValueError, match="protocol"):
        run_preset(_tiny(), tmp_path, "cpu", protocol="fast")


def test_two_stage_from_the_command_line_with_jobs(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(_tiny(lrs=(1e-3, 3e-3, 1e-2), epochs=2)))
    out = tmp_path / "res"
    args = ["mqar", "--config", str(config), "--out", str(out), "--device", "cpu", "--protocol", "two-stage",
            "--screen-epochs", "1"]
    assert main([*args, "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "lr sweep in two stages, for every model alike: each lr of the sweep at 1 epochs" in printed
    assert "6 two-stage screen runs not shown" in printed
    rows = _rows(out / "results.jsonl")
    assert sum(r["stage"] == "screen" for r in rows) == 6 and 4 <= sum(r["stage"] == "final" for r in rows) <= 6
    assert main(args) == 0
    assert "resumed: 6 of 6 screen runs already in" in capsys.readouterr().out
    assert len(_rows(out / "results.jsonl")) == len(rows)


# --- a run stopped part-way goes on from its last epoch ------------------------------------------

def test_a_run_stopped_part_way_goes_on_from_its_checkpoint(tmp_path, monkeypatch):
    import ramnet.mqar.train as train

    preset = MQARPreset.from_dict(_tiny(models=("attention",), lrs=(3e-3,), epochs=3))
    data = train.preset_data(preset, "cpu")
    whole = train.train_run(preset, "attention", 16, 3e-3, *data, "cpu", progress=False)
    evaluate, calls = train.evaluate, []

    def stop_in_epoch_3(*args):  # the "machine" stops during the third epoch's evaluation
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return evaluate(*args)

    monkeypatch.setattr(train, "evaluate", stop_in_epoch_3)
    checkpoint = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        train.train_run(preset, "attention", 16, 3e-3, *data, "cpu", progress=False, checkpoint=checkpoint)
    assert checkpoint.exists() and not checkpoint.with_name("run.pt.tmp").exists()
    monkeypatch.setattr(train, "evaluate", evaluate)
    resumed = train.train_run(preset, "attention", 16, 3e-3, *data, "cpu", progress=False, checkpoint=checkpoint)
    assert resumed["accuracy"] == whole["accuracy"] and resumed["epochs_run"] == whole["epochs_run"] == 3
    # a checkpoint of another run is not used
    other = MQARPreset.from_dict({**_tiny(models=("attention",), lrs=(3e-3,), epochs=3), "seed": 1})
    fresh = train.train_run(other, "attention", 16, 3e-3, *train.preset_data(other, "cpu"), "cpu", progress=False)
    again = train.train_run(other, "attention", 16, 3e-3, *train.preset_data(other, "cpu"), "cpu", progress=False,
                            checkpoint=checkpoint)
    assert again["accuracy"] == fresh["accuracy"]


def test_the_sweep_keeps_checkpoints_only_of_unfinished_runs(tmp_path):
    preset = _tiny(models=("attention",), lrs=(1e-3, 3e-3), epochs=2)
    run_preset(preset, tmp_path, "cpu", log=lambda _: None)
    assert list((tmp_path / "checkpoints").glob("*")) == []  # both rows written: their checkpoints removed
