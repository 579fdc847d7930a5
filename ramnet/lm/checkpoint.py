"""Checkpoints: a directory that `from_pretrained` loads as it is, plus the trainer's state.

    out_dir/checkpoint-000200/
        config.json, model.safetensors     RAMNetForCausalLM.save_pretrained
        tokenizer.json, ...                the data's tokenizer (so eval, generate and lm-eval need nothing else)
        train_config.json                  the TrainConfig of the run
        trainer_state.pt                   optimizer, scheduler, step, data position, RNG states
        manifest.json                      every other file's size and sha256, written last
    out_dir/latest                         the name of the newest complete checkpoint

A checkpoint is written to `checkpoint-NNNNNN.tmp` and renamed when complete (a rename is atomic), and
`latest` is replaced the same way, so a run killed at any moment leaves the previous checkpoint intact.
Resuming checks the manifest and that the weights and the trainer state load; with resume=auto a
checkpoint that fails is skipped, with a warning, for the newest one that passes. A checkpoint from
before manifests (none in it) is loaded unverified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers.utils import logging as hf_logging

from ..files import write_text_atomic

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
log = logging.getLogger(__name__)


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


def trim_metrics(file: Path, step: int) -> None:
    """Drops the rows of `file` (a metrics.jsonl) for steps after `step`, where a run continues (they are
    about to be logged again), and a last line cut off by a kill; rewrites it atomically if that changes it."""
    if not file.exists():
        return
    lines = file.read_text().splitlines(keepends=True)
    kept = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:  # a row torn by a kill
                continue
            kept.append(line)
            continue
        if not (isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step):
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept != lines:
        write_text_atomic(file, "".join(kept))


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
    write_manifest(tmp)  # last: the files that it lists are complete
    if final.exists():  # the same step saved again (a resumed run): rename cannot replace a full directory
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    write_text_atomic(out_dir / "latest", final.name + "\n")
    for stale in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(stale)
    return final


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(path: Path) -> None:
    """manifest.json of checkpoint directory `path`: each other file's size and sha256 (written atomically)."""
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.name != MANIFEST_FILE)
    manifest = {"files": {f.relative_to(path).as_posix(): {"size": f.stat().st_size, "sha256": _sha256(f)} for f in files}}
    write_text_atomic(path / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")


def verify(path: Path) -> bool:
    """Checks checkpoint `path` against its manifest: True when it matches, False when it has none (a
    checkpoint from before manifests); a ValueError saying what differs otherwise."""
    file = path / MANIFEST_FILE
    if not file.exists():
        return False
    try:
        files = json.loads(file.read_text())["files"]
        entries = [(path / name, int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"checkpoint: {file} is malformed ({type(err).__name__}: {err})") from None
    for name in (WEIGHTS_FILE, STATE_FILE):
        if name not in files:
            raise ValueError(f"checkpoint: {file} does not list {name}")
    for f, size, sha in entries:
        if not f.is_file():
            raise ValueError(f"checkpoint: {f} is missing (listed in {file})")
        if f.stat().st_size != size:
            raise ValueError(f"checkpoint: {f} has {f.stat().st_size} bytes, the manifest says {size} (truncated?)")
        if _sha256(f) != sha:
            raise ValueError(f"checkpoint: {f} does not match the sha256 in its manifest (corrupted)")
    return True


def _step(path: Path) -> int | None:
    tail = path.name[len(PREFIX):]
    return int(tail) if path.name.startswith(PREFIX) and tail.isdigit() else None


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints in `out_dir`, oldest first."""
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.glob(f"{PREFIX}*") if _step(p) is not None and (p / STATE_FILE).exists()]
    return sorted(found, key=_step)


def _pointed(out_dir: Path) -> Path | None:
    """The checkpoint that `out_dir/latest` names (None without one); a ValueError if it names something
    other than a checkpoint directory of `out_dir`."""
    pointer = out_dir / "latest"
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    if Path(name).name != name or name in (".", "..") or _step(Path(name)) is None:
        raise ValueError(f"checkpoint: {pointer} names {name!r}, which is not a checkpoint directory of {out_dir} "
                         f"(it must hold a name like {PREFIX}000100 in that directory)")
    return out_dir / name


def latest(out_dir: Path) -> Path | None:
    path = _pointed(out_dir)
    if path is not None and (path / STATE_FILE).exists():
        return path
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def load_trainer_state(path: Path) -> dict:
    # weights_only=False: the state holds Python and numpy RNG states, written by this code.
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as err:  # torch.load's errors for a truncated or garbled file
        raise ValueError(f"checkpoint: {path / STATE_FILE} cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not {"step", "samples", "optimizer", "scheduler", "rng"} <= state.keys():
        raise ValueError(f"checkpoint: {path / STATE_FILE} is not a trainer state (step, samples, optimizer, scheduler, rng)")
    return state


def load(path: Path, model) -> tuple[dict, dict]:
    """Checkpoint `path`, checked against its manifest: (trainer state, full state dict for `model`)."""
    if not verify(path):
        log.info("checkpoint: %s has no %s (written before manifests): loading it unverified", path, MANIFEST_FILE)
    return load_trainer_state(path), load_weights(path, model)


def restore_point(resume: str, out_dir: Path, model) -> tuple[Path, dict, dict] | None:
    """The checkpoint that TrainConfig.resume names, loaded: (path, trainer state, weights), or None.
    With "auto", the newest checkpoint of `out_dir` that is intact: one that fails its manifest or does
    not load is skipped with a warning saying why (a ValueError when none is intact)."""
    path = resume_from(resume, out_dir)
    if path is None:
        return None
    if resume != "auto":
        return (path, *load(path, model))
    candidates = list(dict.fromkeys([path, *reversed(list_checkpoints(out_dir))]))
    problems = []
    for candidate in candidates:
        try:
            return (candidate, *load(candidate, model))
        except ValueError as err:
            problems.append(str(err))
            warnings.warn(f"{err}; not resuming from {candidate}, trying an older checkpoint", stacklevel=2)
    raise ValueError(f"checkpoint: no intact checkpoint in {out_dir} to resume from: " + "; ".join(problems))


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
    try:
        weights = load_file(path / WEIGHTS_FILE)
    except Exception as err:  # safetensors' errors for a truncated or garbled file
        raise ValueError(f"checkpoint: {path / WEIGHTS_FILE} cannot be read ({type(err).__name__}: {err})") from None
    if model.config.tie_word_embeddings:
        names = {module: name for name, module in model.named_modules()}
        embed, head = (names[m] + ".weight" for m in (model.get_input_embeddings(), model.get_output_embeddings()))
        weights.setdefault(head, weights[embed])
    return weights
