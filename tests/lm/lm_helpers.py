"""Shared pieces of the language-modelling tests: a small real-text corpus, its prepared shards
(made once per session) and a tiny training config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydoc_data.topics import topics

from ramnet.lm.config import load_config
from ramnet.lm.data import prepare

TINY_MODEL = dict(hidden_size=32, num_hidden_layers=2, num_heads=2, head_v_dim=16, num_partitions=2,
                  partition_dim=4, topk=2, intermediate_size=64)
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


def tiny_config(data: Path, out_dir: Path, *overrides: str):
    base = [f"data={data}", f"out_dir={out_dir}", "prepare=null", "seq_len=32", "batch_size=4", "micro_batch_size=2", "max_steps=6",
            "warmup_steps=2", "lr=1e-2", "min_lr=1e-3", "eval_interval=3", "eval_batches=2", "save_interval=3",
            "log_interval=1", "report_to=[]", "device=cpu"]
    base += [f"model.{k}={v}" for k, v in TINY_MODEL.items()]
    return load_config(None, None, base + list(overrides))
