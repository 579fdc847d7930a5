"""Checkpoint integrity: the manifest, falling back from a corrupt newest checkpoint, the `latest`
pointer, checkpoints from before manifests."""

import hashlib
import json
import shutil
import warnings

import pytest
from lm_helpers import one_thread, prepared_data, tiny_config  # noqa: F401  (one_thread: an autouse fixture)

from ramnet.lm import checkpoint
from ramnet.lm.train import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_data(tmp_path_factory)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A finished 6-step run with checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("run")
    train(tiny_config(data, out), progress=False)
    return out


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _resume(data, out, *overrides):
    return train(tiny_config(data, out, "max_steps=7", "save_interval=0", "eval_interval=0", *overrides), progress=False)


def test_each_checkpoint_has_a_manifest_of_its_files(run):
    for ckpt in checkpoint.list_checkpoints(run):
        files = json.loads((ckpt / "manifest.json").read_text())["files"]
        on_disk = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json")
        assert sorted(files) == on_disk and "model.safetensors" in files and "trainer_state.pt" in files
        for name, entry in files.items():
            raw = (ckpt / name).read_bytes()
            assert entry == {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        assert checkpoint.verify(ckpt) is True
    assert not list(run.rglob("*.tmp"))


def _truncate(file):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _garble(file):
    raw = bytearray(file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    file.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "name, damage, manifest, match",
    [("model.safetensors", _truncate, True, r"model.safetensors has \d+ bytes, the manifest says \d+ \(truncated\?\)"),
     ("trainer_state.pt", _garble, True, "trainer_state.pt does not match the sha256 in its manifest"),
     ("trainer_state.pt", _truncate, False, "trainer_state.pt cannot be read"),  # no manifest: caught by loading
     ("model.safetensors", _truncate, False, "model.safetensors cannot be read"),
     ("manifest.json", lambda f: f.write_text("{"), True, "manifest.json is malformed")],
)
def test_a_corrupt_newest_checkpoint_falls_back_to_the_newest_intact_one(data, run, tmp_path, name, damage, manifest, match):
    out = _copy(run, tmp_path)
    newest = out / "checkpoint-000006"
    if not manifest:
        for ckpt in checkpoint.list_checkpoints(out):
            (ckpt / "manifest.json").unlink()
    damage(newest / name)
    with pytest.warns(UserWarning, match=f"checkpoint: {newest}/{match}.*; not resuming from {newest}, trying an older checkpoint") as caught:
        result = _resume(data, out)
    assert len([w for w in caught if "checkpoint" in str(w.message)]) == 1
    assert [h["step"] for h in result["history"]] == [4, 5, 6, 7]  # from checkpoint-000003
    with pytest.raises(ValueError, match=match):  # named explicitly: refused, no fallback
        _resume(data, tmp_path / "x", f"resume={newest}")


def test_no_intact_checkpoint_is_an_error(data, run, tmp_path):
    out = _copy(run, tmp_path)
    for ckpt in checkpoint.list_checkpoints(out):
        _truncate(ckpt / "trainer_state.pt")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=f"no intact checkpoint in {out} to resume from"):
        _resume(data, out)


@pytest.mark.parametrize("pointer", ["../other/checkpoint-000003", "/abs/checkpoint-000003", "..", "model.safetensors"])
def test_latest_pointing_outside_the_run_directory_is_refused(data, run, tmp_path, pointer):
    out = _copy(run, tmp_path)
    (tmp_path / "other").mkdir()
    shutil.copytree(out / "checkpoint-000003", tmp_path / "other" / "checkpoint-000003")
    (out / "latest").write_text(pointer + "\n")
    with pytest.raises(ValueError, match=f"{out / 'latest'} names '{pointer}', which is not a checkpoint directory of {out}"):
        _resume(data, out)


def test_a_checkpoint_without_a_manifest_resumes_unverified_without_warnings(data, run, tmp_path, caplog):
    out = _copy(run, tmp_path)
    shutil.rmtree(out / "checkpoint-000006")
    (out / "checkpoint-000003" / "manifest.json").unlink()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("INFO", logger="ramnet.lm.checkpoint"):
        warnings.simplefilter("always")
        result = _resume(data, out)
    assert [h["step"] for h in result["history"]] == [4, 5, 6, 7]
    assert not [w for w in caught if "checkpoint" in str(w.message)]
    assert [r.getMessage() for r in caplog.records if r.name == "ramnet.lm.checkpoint"] == [
        f"checkpoint: {out / 'checkpoint-000003'} has no manifest.json (written before manifests): loading it unverified"]


def test_a_resumed_run_logs_each_step_once(data, run, tmp_path):
    out = _copy(run, tmp_path)
    shutil.rmtree(out / "checkpoint-000006")  # killed after step 6 was logged, before its checkpoint
    before = (out / "metrics.jsonl").read_text().splitlines()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "train/lo')  # and a row torn by the kill
    _resume(data, out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert [json.dumps(r) for r in rows[:3]] == before[:3]  # the rows up to the checkpoint are kept as they were
    assert not list(out.glob("*.tmp"))


def test_trim_metrics_keeps_rows_up_to_the_step(tmp_path):
    file = tmp_path / "metrics.jsonl"
    file.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 2}\n')
    checkpoint.trim_metrics(file, 2)
    assert file.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 2}\n'
    checkpoint.trim_metrics(tmp_path / "none.jsonl", 0)
    assert not (tmp_path / "none.jsonl").exists()
