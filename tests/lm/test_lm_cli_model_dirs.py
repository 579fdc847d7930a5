"""`generate`, `eval ppl` and `eval harness` take a run directory for its latest checkpoint, and
`generate` checks its sampling arguments before it prints anything."""

import json

import pytest
from lm_helpers import one_thread, prepared_data, tiny_config  # noqa: F401  (autouse fixture)

from ramnet.cli import main
from ramnet.lm.cli import harness_args
from ramnet.lm.evaluate import model_directory
from ramnet.lm.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory with checkpoints at steps 3 and 6, whose `latest` names the step-3 one (as after
    a run whose step-6 save was cut short: `latest`, not the highest number, is the newest complete one)."""
    out = tmp_path_factory.mktemp("lm_run")
    train(tiny_config(prepared_data(tmp_path_factory), out, "eval_interval=0"), progress=False)
    assert (out / "checkpoint-000006").is_dir()
    (out / "latest").write_text("checkpoint-000003\n")
    return out


GENERATE = ["--prompt", "Return", "--max-new-tokens", "4", "--temperature", "0"]


def test_generate_follows_a_run_directorys_latest_checkpoint(run, capsys):
    assert main(["generate", "--model", str(run / "checkpoint-000003"), *GENERATE]) == 0
    direct = capsys.readouterr()
    assert main(["generate", "--model", str(run), *GENERATE]) == 0
    via_run = capsys.readouterr()
    assert via_run.out == direct.out and via_run.out.startswith("Return")
    assert via_run.err.splitlines()[0] == (
        f"ramnet generate: {run} is a run directory: using its latest checkpoint, {run / 'checkpoint-000003'}")
    assert "run directory" not in direct.err


def test_loading_a_checkpoint_draws_no_weights_bar_and_quiet_says_nothing(run, capsys):
    assert main(["generate", "--model", str(run), *GENERATE]) == 0
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "run directory" in err
    assert main(["generate", "--quiet", "--model", str(run), *GENERATE]) == 0
    assert "run directory" not in capsys.readouterr().err  # an info line: -q leaves warnings and errors only


def test_eval_ppl_follows_a_run_directorys_latest_checkpoint(run, capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Return the value of the expression. " * 20)
    args = ["--data", str(text), "--max-tokens", "100", "--json"]
    assert main(["eval", "ppl", "--model", str(run / "checkpoint-000003"), *args]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert main(["eval", "ppl", "--model", str(run), *args]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == direct and direct["context"] == 32  # the checkpoint's seq_len
    assert f"using its latest checkpoint, {run / 'checkpoint-000003'}" in captured.err
    assert main(["eval", "ppl", "--model", str(run / "checkpoint-000006"), *args]) == 0
    assert json.loads(capsys.readouterr().out) != direct  # another checkpoint scores otherwise


def test_eval_harness_gets_the_run_directorys_latest_checkpoint(run, capsys):
    ckpt = run / "checkpoint-000003"
    assert harness_args(["--model", "ramnet", "--model_args", f"pretrained={run},dtype=float32", "--tasks", "x"]) == [
        "--model", "ramnet", "--model_args", f"pretrained={ckpt},dtype=float32", "--tasks", "x"]
    assert harness_args([f"--model_args=dtype=float32,pretrained={run}"]) == [f"--model_args=dtype=float32,pretrained={ckpt}"]
    assert f"ramnet eval harness: {run} is a run directory" in capsys.readouterr().err
    untouched = ["--model_args", f"pretrained={ckpt}", "--tasks", f"pretrained={run}", "--model_args", "pretrained=org/name"]
    assert harness_args(untouched) == untouched
    assert capsys.readouterr().err == ""


def test_a_directory_that_is_neither_is_refused_naming_both(run, tmp_path, capsys):
    assert model_directory(run) == run / "checkpoint-000003"
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ramnet generate: error: --model: {tmp_path} is not a model directory (no config.json) "
                          "nor a run directory of `ramnet train` (no `latest`)")
    (tmp_path / "latest").write_text("checkpoint-000009\n")
    assert main(["eval", "ppl", "--model", str(tmp_path)]) == 2
    assert "its `latest` names no complete checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, message", [
    ("--top-p", "1.5", "--top-p must be in (0, 1] (1: no nucleus filter), got 1.5"),
    ("--top-p", "0", "--top-p must be in (0, 1] (1: no nucleus filter), got 0.0"),
    ("--temperature", "-1", "--temperature must be >= 0 (0: greedy), got -1.0"),
    ("--top-k", "-2", "--top-k must be >= 0 (0: no top-k filter), got -2"),
    ("--max-new-tokens", "-1", "--max-new-tokens must be >= 0, got -1"),
])
def test_generate_checks_sampling_before_printing_anything(run, capsys, option, value, message):
    assert main(["generate", "--model", str(run / "checkpoint-000003"), "--prompt", "Return", option, value]) == 2
    assert capsys.readouterr() == ("", f"ramnet generate: error: {message}\n")
