"""MQAR trainer, presets and the `ramnet mqar` command, end to end on a tiny quick preset."""

import copy
import json

import pytest
import torch
import torch.nn as nn

from ramnet.cli import main
from ramnet.mqar.presets import PAPER, PRESETS, check_preset, describe_cuts, get_preset
from ramnet.mqar.report import best_runs, format_table
from ramnet.mqar.sweep import run_preset
from ramnet.mqar.train import evaluate


def test_paper_preset_is_the_spec_protocol():
    assert PAPER["vocab_size"] == 8192
    assert PAPER["train"] == [[64, 4, 100_000], [128, 8, 20_000], [256, 16, 20_000], [256, 32, 20_000],
                              [256, 64, 20_000]]
    assert PAPER["test"] == [[64, 4, 1000], [64, 8, 1000], [64, 16, 1000], [128, 32, 1000], [256, 64, 1000],
                             [512, 128, 1000], [1024, 256, 1000]]
    assert PAPER["batch_size"] == 256 and PAPER["epochs"] == 32 and PAPER["early_stop"] == 0.99
    assert PAPER["weight_decay"] == 0.1 and PAPER["d_models"] == [64, 128, 256]
    torch.testing.assert_close(torch.tensor(PAPER["lrs"], dtype=torch.float64), torch.logspace(-3, -1.5, 4, dtype=torch.float64))
    assert PAPER["model"]["n_layers"] == 2 and PAPER["model"]["short_conv"] == 3
    assert describe_cuts(PAPER) == []


def test_presets_are_valid_and_quick_says_what_it_cuts():
    for name in PRESETS:
        check_preset(get_preset(name))
    quick = get_preset("quick")
    assert set(quick["models"]) == {"ramnet", "attention", "sliding_window", "linear_attention"}
    assert quick["d_models"] == [64]
    assert [L for L, _, _ in quick["test"]] == [L for L, _, _ in PAPER["test"]]  # all seven settings
    cuts = "\n".join(describe_cuts(quick))
    assert "vocab_size: 2048 instead of 8192" in cuts and "epochs" in cuts and "(L=256, N=64): 0 examples" in cuts
    m = {(e["mixer"]["kwargs"]["num_partitions"], e["mixer"]["kwargs"]["partition_dim"])
         for e in get_preset("ablation-u")["models"].values()}
    assert m == {(1, 4096), (2, 64), (3, 16), (4, 8), (6, 4), (12, 2)}  # all M = 4096
    m = [(e["mixer"]["kwargs"]["num_partitions"], e["mixer"]["kwargs"]["partition_dim"])
         for e in get_preset("ablation-m")["models"].values()]
    assert {u for u, _ in m} == {4} and [dp ** 4 for _, dp in m] == [16, 256, 4096, 65536]  # one U, M growing


@pytest.mark.parametrize("change,match", [
    (lambda p: p.pop("epochs"), "missing keys"),
    (lambda p: p.update(bogus=1), "unknown keys"),
    (lambda p: p.update(train=[[64, 4]]), "seq_len, kv_pairs, examples"),
    (lambda p: p.update(test=[[63, 4, 10]]), "must be even"),
    (lambda p: p.update(lrs=[]), "lrs"),
    (lambda p: p.update(lrs=[-1e-3]), "lrs"),
    (lambda p: p.update(d_models=[64.0]), "d_models"),
    (lambda p: p.update(batch_size=0), "batch_size"),
    (lambda p: p.update(models={"x": {"mixer": {"name": "attention"}, "extra": 1}}), "an entry is"),
    (lambda p: p.update(models={"x": {"mixer": {"name": "attention"}, "lrs": "1e-3"}}), "lrs"),
    (lambda p: p.update(model={"n_layer": 2}), "keys among"),
    (lambda p: p.update(models={"x": {"mixer": {"name": "attention"}, "model": {"conv": 0}}}), "keys among"),
    (lambda p: p.update(early_stop="0.99"), "early_stop"),
])
def test_bad_presets_raise(change, match):
    preset = get_preset("quick")
    change(preset)
    with pytest.raises(ValueError, match=match):
        check_preset(preset)


class CopyInput(nn.Module):
    """Predicts the input token at each selected position."""

    def forward(self, x, select):
        return nn.functional.one_hot(x[select], 16).float()


def test_accuracy_is_a_mean_over_examples_of_per_example_means():
    x = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    y = torch.full_like(x, -100)
    y[0, 0] = 1  # row 0: 1 label, right        -> 1.0
    y[1, :3] = torch.tensor([5, 0, 0])  # row 1: 3 labels, 1 right -> 1/3
    acc = evaluate(CopyInput(), [{"seq_len": 4, "kv_pairs": 9, "inputs": x, "labels": y}], batch_size=1)
    assert acc == {"L4/N9": pytest.approx((1.0 + 1 / 3) / 2)}  # a pooled mean would give 2/4


def test_best_lr_selection_and_table():
    rows = [{"preset": "p", "model": "a", "d_model": 64, "lr": lr, "avg_accuracy": acc, "state_size": 10,
             "accuracy": {"L64/N4": acc}} for lr, acc in ((1e-3, 0.5), (1e-2, 0.9), (3e-2, 0.7))]
    rows.append({**rows[0], "model": "b", "state_size": None})
    best = best_runs(rows)
    assert [(r["model"], r["lr"]) for r in best] == [("a", 1e-2), ("b", 1e-3)]
    table = format_table(rows)
    assert "0.900" in table and "0.01" in table and "?" in table and "preset" not in table


def _row(**change):
    row = {"preset": "p", "model": "a", "d_model": 64, "lr": 1e-3, "avg_accuracy": 0.5, "state_size": 10,
           "seed": 0, "epochs_run": 7, "protocol": {"epochs": 7, "vocab_size": 2048},
           "mixer": {"name": "attention"}, "accuracy": {"L64/N4": 0.5}}
    return {**row, **change}


def test_rows_of_other_epochs_seeds_or_protocols_are_never_merged():
    rows = [_row(), _row(lr=1e-2, avg_accuracy=0.6),  # an lr sweep: one result, its best lr
            _row(seed=1, avg_accuracy=0.9),  # another seed
            _row(protocol={"epochs": 1, "vocab_size": 2048}, epochs_run=1, avg_accuracy=0.2),  # other epochs
            _row(protocol={"epochs": 7, "vocab_size": 8192}, avg_accuracy=0.3),  # other vocabulary
            _row(mixer={"name": "attention", "kwargs": {"num_heads": 2}}, avg_accuracy=0.95)]  # other mixer
    best = best_runs(rows)
    assert [(r["lr"], r["avg_accuracy"]) for r in best] == [(1e-2, 0.6), (1e-3, 0.9), (1e-3, 0.2), (1e-3, 0.3),
                                                            (1e-3, 0.95)]


def test_a_rerun_of_the_same_configuration_replaces_only_itself():
    rows = [_row(avg_accuracy=0.9), _row(lr=1e-2, avg_accuracy=0.6), _row(seed=1, avg_accuracy=0.4),
            _row(avg_accuracy=0.5)]  # the first run again, later: it counts, not the earlier 0.9
    assert [(r["lr"], r["seed"], r["avg_accuracy"]) for r in best_runs(rows)] == [(1e-2, 0, 0.6), (1e-3, 1, 0.4)]


def test_the_table_shows_epochs_and_seed_and_tells_equal_looking_configurations_apart():
    table = format_table([_row(), _row(seed=3, epochs_run=2, protocol={"epochs": 4})]).splitlines()
    assert table[0].split()[:7] == ["model", "d_model", "state", "lr", "epochs", "seed", "avg"]
    assert table[2].split()[4:6] == ["7/7", "0"] and table[3].split()[4:6] == ["2/4", "3"]
    # same epochs and seed, other vocabulary: a config column with a hash of each configuration
    table = format_table([_row(), _row(protocol={"epochs": 7, "vocab_size": 8192})]).splitlines()
    assert table[0].split()[:2] == ["model", "config"]
    assert len({line.split()[1] for line in table[2:]}) == 2


@pytest.mark.filterwarnings("ignore:No artists with labels")  # the stand-in plot below adds no artist
def test_the_figure_draws_every_configuration_of_the_results_file(tmp_path, monkeypatch):
    import matplotlib.axes

    import ramnet.mqar.plot as plot

    drawn = []

    # the model lines of mqar_accuracy_vs_state.png only: not the frontier's marks, not mqar_frontier.png
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, x, y, *a, label=None, **k: (
        label not in (None, "Pareto frontier") and drawn.append((label, list(x), list(y))),
        [matplotlib.lines.Line2D([], [])])[1])
    monkeypatch.setattr(plot, "_frontier_figure", lambda plt, main, labels, path: path)
    rows = [_row(d_model=64, state_size=10), _row(d_model=128, state_size=20, avg_accuracy=0.7),
            _row(d_model=64, state_size=10, seed=1, avg_accuracy=0.8)]
    plot.plot_results(rows, tmp_path)
    drawn.clear()
    plot.plot_results([*rows[:2], {**rows[2], "protocol": {"epochs": 1}}], tmp_path)
    assert sorted(label for label, _, _ in drawn) == ["a (1 epoch, seed 1)", "a (7 epochs, seed 0)"]
    drawn.clear()
    plot.plot_results(rows, tmp_path)
    assert sorted(drawn) == [("a (7 epochs, seed 0)", [10, 20], [0.5, 0.7]), ("a (7 epochs, seed 1)", [10], [0.8])]


def _tiny_quick():
    """The quick preset, same models and protocol, with every size shrunk to seconds."""
    preset = copy.deepcopy(PRESETS["quick"])
    preset.update(vocab_size=64, train=[[16, 2, 64], [32, 4, 32]], test=[[16, 2, 16], [32, 4, 16]],
                  batch_size=16, test_batch_size=8, epochs=2, d_models=[16], name="tiny-quick")
    return preset


def test_quick_preset_end_to_end_on_a_tiny_size(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(_tiny_quick()))
    out = tmp_path / "res"
    assert main(["mqar", "--config", str(config), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "vocab_size: 64 instead of 8192" in printed
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == ["ramnet", "attention", "sliding_window", "linear_attention"]
    for r in rows:
        assert set(r["accuracy"]) == {"L16/N2", "L32/N4"}
        assert 0.0 <= r["avg_accuracy"] <= 1.0 and r["state_size"] > 0 and r["device"].startswith("cpu")
        assert {"mixer", "lr", "wall_time_s", "git_rev", "d_model", "epochs_run"} <= set(r)
    assert rows[0]["state_size"] == 16 * 3 + 2 * 16 ** 2 * (8 + 1)
    for r in rows:
        assert f"{r['model']}" in printed
    png = out / "mqar_accuracy_vs_state.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert (out / "mqar_frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "mqar_table.md").read_text().startswith("| model | d_model | state |")
    # run again: every run is in the results file already, so none runs
    assert main(["mqar", "--config", str(config), "--out", str(out), "--models", "attention"]) == 0
    assert "resumed: 1 of 1 runs already in" in capsys.readouterr().out
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
    # --rerun: same seed, same results; the plot subcommand redraws from the JSONL (now 5 rows)
    assert main(["mqar", "--config", str(config), "--out", str(out), "--models", "attention", "--rerun"]) == 0
    rows2 = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows2) == 5 and rows2[-1]["model"] == "attention"
    assert rows2[-1]["accuracy"] == rows[1]["accuracy"]
    png.unlink()
    assert main(["mqar", "--out", str(out), "plot"]) == 0
    assert png.exists()


def test_a_rerun_of_one_model_reports_the_whole_results_file(tmp_path, capsys, monkeypatch):
    import ramnet.mqar.cli as mqar_cli

    preset = _tiny_quick()
    preset["models"] = {m: preset["models"][m] for m in ("attention", "sliding_window")}
    preset["epochs"] = 1
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(preset))
    out = tmp_path / "res"
    assert main(["mqar", "--config", str(config), "--out", str(out), "--device", "cpu"]) == 0
    drawn = []
    monkeypatch.setattr(mqar_cli, "plot_results", lambda rows, out: drawn.append(rows) or [])
    capsys.readouterr()
    assert main(["mqar", "--config", str(config), "--out", str(out), "--models", "sliding_window",
                 "--epochs", "2", "--seed", "1"]) == 0
    table = capsys.readouterr().out.split("d_model")[-1].splitlines()[2:]
    # the earlier two runs and the new one, apart: the table shows all three, the figure gets all rows
    assert sorted((line.split()[0], line.split()[4], line.split()[5]) for line in table) == [
        ("attention", "1/1", "0"), ("sliding_window", "1/1", "0"), ("sliding_window", "2/2", "1")]
    assert [(r["model"], r["seed"]) for r in drawn[0]] == [("attention", 0), ("sliding_window", 0),
                                                           ("sliding_window", 1)]


def test_concurrent_runs_give_the_rows_of_sequential_runs(tmp_path):
    preset = _tiny_quick()
    preset["models"] = {m: preset["models"][m] for m in ("ramnet", "attention")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers get one thread each: the same arithmetic
    try:
        sequential = run_preset(preset, tmp_path / "seq", "cpu", log=lambda _: None)
        concurrent = run_preset(preset, tmp_path / "par", "cpu", log=lambda _: None, jobs=2)
    finally:
        torch.set_num_threads(threads)
    key = lambda r: r["model"]  # noqa: E731  (completion order may differ)
    for a, b in zip(sorted(sequential, key=key), sorted(concurrent, key=key)):
        assert (a["model"], a["accuracy"], a["epochs_run"]) == (b["model"], b["accuracy"], b["epochs_run"])
    assert len((tmp_path / "par" / "results.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ValueError, match="jobs"):
        run_preset(preset, tmp_path / "bad", "cpu", jobs=0)


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failing_run_costs_only_itself(tmp_path, capsys, jobs):
    preset = _tiny_quick()
    broken = {"mixer": {"name": "attention", "kwargs": {"num_heads": 3}}}  # 16 channels over 3 heads
    preset["models"] = {"broken": broken, "attention": preset["models"]["attention"]}
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(preset))
    out = tmp_path / "res"
    assert main(["mqar", "--config", str(config), "--out", str(out), "--device", "cpu", "--jobs", str(jobs)]) == 1
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == ["attention"]
    captured = capsys.readouterr()
    assert "1 run(s) failed: broken d_model=16" in captured.err and "attention" in captured.out
    assert (out / "mqar_accuracy_vs_state.png").exists()  # the finished run is still drawn


def test_cli_errors(tmp_path, capsys):
    assert main(["mqar", "--models", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown model(s) ['nope']" in capsys.readouterr().err
    assert main(["mqar", "--preset", "paper", "--models", "gla", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["mqar", "--config", str(bad)]) == 2
    assert "cannot read the preset file" in capsys.readouterr().err
    assert main(["mqar", "plot", "--out", str(tmp_path / "none")]) == 2
    assert "no results" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["mqar", "--preset", "nope"])


def test_dump_config_round_trips(tmp_path, capsys):
    assert main(["mqar", "--preset", "ablation-m", "--lrs", "0.001,0.01", "--epochs", "3", "--dump-config"]) == 0
    dumped = json.loads(capsys.readouterr().out)
    assert dumped["lrs"] == [0.001, 0.01] and dumped["epochs"] == 3 and dumped["ablation"] == "M"
    assert check_preset(dumped) == dumped
