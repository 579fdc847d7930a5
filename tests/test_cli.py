"""The ramnet console script."""

import argparse
import json
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


def _error(capsys, argv: list[str]) -> str:
    """The one-line error of a command line that argparse refuses (status 2)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, key", [(["--max-steps", "10"], "max_steps=10"), (["--max-steps=10", "lr=1e-3"], "max_steps=10"),
                                       (["--model.hidden-size", "64"], "model.hidden_size=64"), (["--lr"], "lr=VALUE")])
def test_train_options_that_are_config_keys_name_the_override_form(capsys, argv, key):
    option = argv[0].partition("=")[0]
    assert _error(capsys, ["train", *argv]) == (
        f"ramnet train: error: unknown option {option}; config keys are set as key=value, e.g. {key}")


def test_train_unknown_options_name_the_close_option_or_the_override_form(capsys):
    assert _error(capsys, ["train", "--dump_config"]).endswith("unknown option --dump_config; did you mean --dump-config?")
    assert "config keys are set as key=value, e.g. max_steps=10" in _error(capsys, ["train", "--frobnicate", "3"])


def test_mqar_unknown_option_is_named_not_read_as_a_subcommand(capsys):
    # was: "invalid choice: '128' (choose from 'plot')"
    assert _error(capsys, ["mqar", "--d_model", "128"]) == "ramnet mqar: error: unknown option --d_model; did you mean --d-models?"
    assert _error(capsys, ["mqar", "plot", "--outt", "x"]) == "ramnet mqar plot: error: unknown option --outt; did you mean --out?"


def test_option_values_are_not_taken_for_options(capsys):
    from ramnet.cli import build_parser

    args = build_parser().parse_args(["mqar", "--lrs", "-1", "--out=--weird", "--seed", "-3", "--device", "plot"])
    assert (args.lrs, args.out, args.seed, args.device, args.mqar_command) == ([-1.0], "--weird", -3, "plot", None)
    # lm-eval's options go to the harness untouched (its parser's options start with "+")
    args = build_parser().parse_args(["eval", "harness", "--model", "ramnet", "--tasks", "wikitext"])
    assert args.lm_eval_args == ["--model", "ramnet", "--tasks", "wikitext"]


def _parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_no_parser_takes_abbreviations(capsys):
    from ramnet.cli import build_parser

    parsers = list(_parsers(build_parser()))
    assert len(parsers) >= 9 and all(not p.allow_abbrev for p in parsers)
    assert _error(capsys, ["mqar", "--model", "attention"]) == "ramnet mqar: error: unknown option --model; did you mean --models?"
    assert "unknown option --max-new" in _error(capsys, ["generate", "--model", "x", "--max-new", "5"])


@pytest.mark.parametrize("override, message", [
    ("model.hidden_sizes=10", "ramnet train: error: `model`: unknown RAMNetConfig key(s) ['hidden_sizes'] (model_type='ramnet')"),
    ("device=cuda", "ramnet train: error: `device`: cuda was asked for, but torch sees no CUDA GPU"),
])
def test_train_checks_the_whole_config_before_dumping_it_or_preparing_data(capsys, monkeypatch, tmp_path, override, message):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--dump-config", override]) == 2
    assert capsys.readouterr() == ("", message + "\n")
    assert main(["train", "--quiet", override]) == 2  # the tiny preset would prepare data/ first
    assert capsys.readouterr().err == message + "\n"
    assert list(tmp_path.iterdir()) == []


def test_dump_config_of_a_good_config_is_the_resolved_config(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["train", "--dump-config", "--preset", "small-transformer", "model.num_hidden_layers=3", "device=cpu"]) == 0
    dumped = json.loads(capsys.readouterr().out)
    assert dumped["model_type"] == "transformer++" and dumped["model"]["num_hidden_layers"] == 3
