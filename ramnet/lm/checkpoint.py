"""Checkpoints: a directory that `from_pretrained` loads as it is, plus the trainer's state.

    out_dir/checkpoint-000200/
        config.json, model.safetensors     RAMNetForCausalLM.save_pretrained
        tokenizer.json, ...                the data's tokenizer (so eval, generate and lm-eval need nothing else)
        train_config.json                  the TrainConfig of the run
        trainer_state.pt                   optimizer, scheduler, step, data position, RNG states
    out_dir/latest                         the name of the newest complete checkpoint

A checkpoint is written to `checkpoint-NNNNNN.tmp` and renamed when complete (a rename is atomic), and
`latest` is replaced the same way, so a run killed at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers.utils import logging as hf_logging

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "model.safetensors"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(out_dir: Path, step: int, model, state_dict: dict, tokenizer, train_config: dict, trainer_state: dict, keep: int) -> Path:
    """Write checkpoint `step` (rank 0 only; `state_dict` is the full one) and keep the newest `keep`."""
    final = out_dir / f"{PREFIX}{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Writing model shards" bar would break the training bar
    try:
        model.save_pretrained(tmp, state_dict=state_dict)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(tmp)
    (tmp / "train_config.json").write_text(json.dumps(train_config, indent=2))
    torch.save(trainer_state, tmp / STATE_FILE)
    if final.exists():  # the same step saved again (a resumed run): rename cannot replace a full directory
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _write_atomic(out_dir / "latest", final.name + "\n")
    for stale in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(stale)
    return final


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints in `out_dir`, oldest first."""
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.glob(f"{PREFIX}*") if p.suffix not in (".tmp", ".old") and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest(out_dir: Path) -> Path | None:
    pointer = out_dir / "latest"
    if pointer.exists():
        path = out_dir / pointer.read_text().strip()
        if (path / STATE_FILE).exists():
            return path
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def load_trainer_state(path: Path) -> dict:
    # weights_only=False: the state holds Python and numpy RNG states, written by this code.
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)


def resume_from(resume: str, out_dir: Path) -> Path | None:
    """The checkpoint that TrainConfig.resume names: "auto" the newest in `out_dir` (None if there is
    none), "none" no checkpoint (refusing an `out_dir` that has some), else a checkpoint directory."""
    if resume == "auto":
        return latest(out_dir)
    if resume == "none":
        if list_checkpoints(out_dir):
            raise ValueError(f"`resume` is 'none' but {out_dir} has checkpoints: use resume=auto or another out_dir")
        return None
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        raise ValueError(f"`resume`: {path} is not a checkpoint (no {STATE_FILE})")
    return path


def load_weights(path: Path, model) -> dict:
    """The full state dict of checkpoint `path` for `model` (its PreTrainedModel). `save_pretrained`
    stores a tied weight once: the LM head gets the input embedding's."""
    weights = load_file(path / WEIGHTS_FILE)
    if model.config.tie_word_embeddings:
        names = {module: name for name, module in model.named_modules()}
        embed, head = (names[m] + ".weight" for m in (model.get_input_embeddings(), model.get_output_embeddings()))
        weights.setdefault(head, weights[embed])
    return weights
