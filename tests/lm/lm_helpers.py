"""Shared pieces of the language-modelling tests: a small real-text corpus, its prepared shards
(made once per session) and a tiny training config."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydoc_data.topics import topics
from transformers import AutoModelForCausalLM

from ramnet.lm.config import load_config
from ramnet.lm.data import prepare
from ramnet.lm.train import train

TINY_MODEL = dict(hidden_size=32, num_hidden_layers=2, num_heads=2, head_v_dim=16, num_partitions=2,
                  partition_dim=4, topk=2, intermediate_size=64)
TINY_LLAMA = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
_prepared: dict[str, Path] = {}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second thread brings nothing, and on a busy 2-core machine OpenMP's
    threads wait on each other (a 60-step run took 22 s with 2 threads, 3 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_corpus(path: Path, n_docs: int = 40) -> Path:
    """The first `n_docs` pydoc topics (~60k words of English), one .txt file each."""
    path.mkdir(parents=True, exist_ok=True)
    for key in sorted(topics)[:n_docs]:
        (path / f"{key}.txt").write_text(topics[key])
    return path


def prepared_data(tmp_path_factory) -> Path:
    """A prepared directory (BPE of 512 tokens, every 10th document held out), made once per session."""
    if "data" not in _prepared:
        root = tmp_path_factory.mktemp("lm_data")
        prepare(root / "data", source=str(write_corpus(root / "corpus")), vocab_size=512, val_every=10, progress=False)
        _prepared["data"] = root / "data"
    return _prepared["data"]


def tiny_args(data: Path, out_dir: Path, *overrides: str, model: dict = TINY_MODEL) -> list[str]:
    """key=value arguments of a 6-step CPU run; `model` becomes model.* overrides (TINY_LLAMA with
    model_type=transformer++)."""
    base = [f"data={data}", f"out_dir={out_dir}", "prepare=null", "seq_len=32", "batch_size=4", "micro_batch_size=2", "max_steps=6",
            "warmup_steps=2", "lr=1e-2", "min_lr=1e-3", "eval_interval=3", "eval_batches=2", "save_interval=3",
            "log_interval=1", "report_to=[]", "device=cpu"]
    return base + [f"model.{k}={v}" for k, v in model.items()] + list(overrides)


def tiny_config(data: Path, out_dir: Path, *overrides: str, model: dict = TINY_MODEL):
    return load_config(None, None, tiny_args(data, out_dir, *overrides, model=model))


def check_resume_is_exact(data: Path, tmp_path: Path, *overrides: str, model: dict = TINY_MODEL) -> None:
    """A run killed after its step-3 checkpoint and resumed reproduces the uninterrupted run bit for bit."""
    straight = train(tiny_config(data, tmp_path / "a", *overrides, model=model), progress=False)  # checkpoints at 3 and 6
    # A run killed after its step-3 checkpoint: only that one is in its out_dir.
    shutil.copytree(tmp_path / "a" / "checkpoint-000003", tmp_path / "b" / "checkpoint-000003")
    resumed = train(tiny_config(data, tmp_path / "b", *overrides, model=model), progress=False)
    assert [h["step"] for h in resumed["history"]] == [4, 5, 6]
    for key in ("train/loss", "train/grad_norm"):  # bitwise
        assert [h[key] for h in resumed["history"]] == [h[key] for h in straight["history"][3:]], key
    assert resumed["evals"] == straight["evals"][1:]
    weights = [AutoModelForCausalLM.from_pretrained(r["checkpoint"]).state_dict() for r in (straight, resumed)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def _torchrun(data: Path, out_dir: Path, *overrides: str, model: dict) -> list[dict]:
    """The run on 2 gloo processes launched by torchrun; its metrics.jsonl."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ramnet.cli",
            "train", "--quiet", *tiny_args(data, out_dir, *overrides, model=model)]
    # Its own process group, so that a run past the limit is ended with its workers (killing torchrun alone
    # would leave them running), and what it printed so far goes into the failure (a hang was seen once on
    # the 2-core CI machine and could not be reproduced).
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as run:
        try:
            output, _ = run.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            output, _ = run.communicate()
            pytest.fail(f"torchrun did not finish in 240 s; its output:\n{output[-6000:]}")
    assert run.returncode == 0, output[-6000:]
    return [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_close(single: list[dict], multi: list[dict]) -> None:
    assert [a["step"] for a in single] == [b["step"] for b in multi]
    for a, b in zip(single, multi):
        assert a.keys() == b.keys()
        for key in {"train/loss", "train/grad_norm", "val/loss"} & a.keys():
            assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a, b)


def check_two_processes_match_one(data: Path, tmp_path: Path, parallel: str, steps: int, *overrides: str,
                                  model: dict = TINY_MODEL) -> None:
    """2 processes with micro-batch 2 and no accumulation match 1 process with 2 accumulation steps (the
    same global batch of 4): metrics, and the full weights of the checkpoints. With more than 3 steps,
    the 2-process run is also resumed from its step-3 checkpoint."""
    overrides = (*overrides, f"max_steps={steps}")
    single = train(tiny_config(data, tmp_path / "one", *overrides, model=model), progress=False)["history"]
    multi = _torchrun(data, tmp_path / "two", *overrides, f"parallel={parallel}", model=model)
    _assert_close(single, multi)
    last = f"checkpoint-{steps:06d}"
    one, two = (AutoModelForCausalLM.from_pretrained(tmp_path / run / last).state_dict() for run in ("one", "two"))
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)
    if steps > 3:  # resume the 2-process run from its step-3 checkpoint
        shutil.rmtree(tmp_path / "two" / last)
        (tmp_path / "two" / "metrics.jsonl").unlink()
        _assert_close(single[3:], _torchrun(data, tmp_path / "two", *overrides, f"parallel={parallel}", model=model))
