"""pyproject's dependencies: the core is what `import ramnet` and the `ramnet` command need; plots,
TensorBoard and YAML configs are extras, each named by the error of the command that needs it."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Not yaml: huggingface_hub (a dependency of transformers) imports it, so it is always installed;
# the yaml extra only states the need (test_a_yaml_config_without_pyyaml_names_the_extra).
OPTIONAL = ("matplotlib", "tensorboard")


def _name(requirement: str) -> str:
    return requirement.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip()


def test_core_dependencies_are_what_import_ramnet_needs():
    assert {_name(r) for r in PYPROJECT["dependencies"]} == {
        "torch", "transformers", "safetensors", "tqdm", "tokenizers", "numpy"}
    extras = PYPROJECT["optional-dependencies"]
    assert [_name(r) for r in extras["plot"]] == ["matplotlib"] and [_name(r) for r in extras["yaml"]] == ["pyyaml"]
    assert [_name(r) for r in extras["tensorboard"]] == ["tensorboard"]
    # .ci/run installs .[test,triton]: the test extra brings everything the tests use
    assert {"pytest", "pytest-xdist", "matplotlib", "pyyaml", "tensorboard"} <= {_name(r) for r in extras["test"]}
    assert "<" in extras["triton"][0]  # pinned above as well as below


def _without_optional(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter where matplotlib and tensorboard cannot be imported."""
    block = f"import sys; sys.modules.update(dict.fromkeys({list(OPTIONAL)!r}, None)); "
    return subprocess.run([sys.executable, "-c", block + code], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_import_ramnet_and_the_commands_run_without_the_extras(tmp_path):
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "results.jsonl").write_text(json.dumps({
        "preset": "p", "model": "a", "d_model": 64, "lr": 1e-3, "avg_accuracy": 0.5, "state_size": 10,
        "accuracy": {"L64/N4": 0.5}}) + "\n")
    from ramnet.mqar.presets import get_preset

    tiny = {**get_preset("quick"), "vocab_size": 64, "train": [[16, 2, 16]], "test": [[16, 2, 8]], "epochs": 1,
            "d_models": [16], "name": "tiny"}
    tiny["models"] = {"attention": tiny["models"]["attention"]}
    (tmp_path / "tiny.json").write_text(json.dumps(tiny))
    code = """
import ramnet, ramnet.lm.train, ramnet.lm.evaluate, ramnet.mqar.sweep
from ramnet.cli import main
codes = [main(["train", "--dump-config", "device=cpu", "report_to=[]"]),
         main(["train", "--dump-config", "device=cpu", "report_to=[tensorboard]"]),
         main(["mqar", "--out", "rows", "plot"]),
         main(["mqar", "--config", "tiny.json", "--device", "cpu", "--out", "tiny"])]
print("codes", codes)
"""
    done = _without_optional(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "codes [0, 2, 2, 0]" in done.stdout
    assert "ramnet mqar: warning: the figures need matplotlib, which is not installed: pip install 'ramnet[plot]'; " \
        "the table is printed, the figures are not drawn" in done.stderr
    assert (tmp_path / "tiny" / "results.jsonl").exists() and not list((tmp_path / "tiny").glob("*.png"))
    assert "`report_to` has 'tensorboard', but tensorboard is not installed: pip install 'ramnet[tensorboard]'" \
        in done.stderr
    assert "the figures need matplotlib, which is not installed: pip install 'ramnet[plot]'" in done.stderr


def test_a_yaml_config_without_pyyaml_names_the_extra(tmp_path, monkeypatch):
    from ramnet.lm.config import load_config

    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 5\n")
    assert load_config(file=config).max_steps == 5
    (tmp_path / "run.json").write_text('{"max_steps": 7}')
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(ValueError, match=r"a YAML config file needs PyYAML: pip install 'ramnet\[yaml\]' \(or write "
                                         r"the file as JSON"):
        load_config(file=config)
    assert load_config(file=tmp_path / "run.json").max_steps == 7  # JSON needs nothing


@pytest.mark.parametrize("path", ["LICENSE", "CITATION.cff"])
def test_licence_and_citation_are_there(path):
    text = (ROOT / path).read_text()
    assert ("Apache License" in text and "Version 2.0" in text) if path == "LICENSE" else "2602.11958" in text
