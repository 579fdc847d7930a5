"""Strided perplexity of a checkpoint on any text.

The documents are joined into one token stream (each followed by EOS, as in training) and scored
with overlapping windows of `context` tokens that advance by about `stride`: every token is scored
once, with at least `context - stride` tokens of context in its window (fewer only at the start).
`stride == context` gives nearly disjoint windows (cheapest, least context).
"""

from __future__ import annotations

import json
import math
from itertools import islice
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from .. import models  # noqa: F401  (registers RAM-Net with the Auto classes)
from ..devices import resolve_device
from . import checkpoint
from .corpus import documents, held_out
from .families import register_checkpoint
from .tokenizer import encode_batch


def model_directory(model_dir: str | Path) -> Path:
    """The model directory that `model_dir` names: a checkpoint or `save_pretrained` directory (one with
    a config.json) as it is, or the run directory of `ramnet train` (its `out_dir`), whose newest complete
    checkpoint (the one its `latest` file names) it stands for."""
    path = Path(model_dir)
    if (path / "config.json").exists():
        return path
    if (path / "latest").exists():
        found = checkpoint.latest(path)
        if found is not None and (found / "config.json").exists():
            return found
        raise ValueError(f"--model: {path} is a run directory, but its `latest` names no complete checkpoint and it has none")
    raise ValueError(f"--model: {path} is not a model directory (no config.json) nor a run directory of `ramnet train` "
                     "(no `latest`): pass a checkpoint directory, e.g. runs/tiny/checkpoint-000400, or its run, runs/tiny")


def load(model_dir: str | Path, device: torch.device):
    """Model (eval mode) and tokenizer of a checkpoint or `save_pretrained` directory, of any family (a
    run directory stands for its latest checkpoint: `model_directory`)."""
    path = model_directory(model_dir)
    register_checkpoint(path)
    # No "Loading weights" bar: a local checkpoint of this size loads in a moment, on every eval and generate.
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return model, AutoTokenizer.from_pretrained(path)


def trained_context(model_dir: str | Path) -> int | None:
    """The training sequence length of a checkpoint (from its train_config.json), if it has one."""
    file = Path(model_dir) / "train_config.json"
    return json.loads(file.read_text())["seq_len"] if file.exists() else None


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over a stream of `n` tokens. A window
    scores the tokens from where the previous one stopped, and starts `context - stride` tokens (at
    least one: a token is predicted from the one before it) earlier."""
    if context < 2:
        raise ValueError(f"--context must be at least 2, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"--stride must be in [1, context={context}], got {stride}")
    out, scored_to = [], 1  # token 0 has no prediction
    while scored_to < n:
        begin = max(0, scored_to - max(1, context - stride))
        end = min(begin + context, n)
        out.append((begin, end, scored_to))
        scored_to = end
    return out


@torch.no_grad()
def stream_nll(model, ids: torch.Tensor, context: int, stride: int, batch_size: int, progress: bool = False) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of tokens 1..n-1 of `ids`, and how many were scored."""
    device = next(model.parameters()).device
    spans = windows(len(ids), context, stride)
    total, count = 0.0, 0
    groups: dict[int, list] = {}  # windows of one length batch together (all but the last few are full)
    for span in spans:
        groups.setdefault(span[1] - span[0], []).append(span)
    bar = tqdm(total=len(spans), unit="window", disable=not progress)
    for length, group in groups.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            batch = torch.stack([ids[b:e] for b, e, _ in chunk]).to(device)
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits.float()
            logp = torch.log_softmax(logits, -1).gather(-1, batch[:, 1:, None])[..., 0]
            # target j of a window is token begin + 1 + j; keep those at or after the first scored one
            offset = torch.arange(1, length, device=device)[None] + torch.tensor([b for b, _, _ in chunk], device=device)[:, None]
            keep = offset >= torch.tensor([s for _, _, s in chunk], device=device)[:, None]
            total -= logp[keep].double().sum().item()
            count += int(keep.sum())
            bar.update(len(chunk))
    bar.close()
    return total, count


def perplexity(
    model_dir: str | Path,
    source: str = "python-docs",
    split: str = "train",
    text_column: str | None = None,
    held_out_every: int = 0,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Perplexity of the checkpoint in `model_dir` on the documents of `source` (see `corpus.documents`).
    `held_out_every=N` keeps only the documents that `ramnet data prepare --val-every N` held out.
    `context` defaults to the checkpoint's training length, `stride` to half of it."""
    model_dir = model_directory(model_dir)
    model, tok = load(model_dir, resolve_device(device))
    context = context or trained_context(model_dir) or 1024
    stride = stride or max(1, context // 2)
    docs = (d for i, d in enumerate(documents(source, split, text_column)) if not held_out_every or held_out(i, held_out_every))
    ids: list[int] = []
    texts: list[str] = []
    while max_tokens is None or len(ids) < max_tokens:  # a streamed dataset is read only as far as needed
        batch = list(islice(docs, 256))
        if not batch:
            break
        texts += batch
        for doc_ids in encode_batch(tok, batch):
            ids += doc_ids + [tok.eos_token_id]
    truncated = max_tokens is not None and len(ids) > max_tokens
    ids = ids[:max_tokens] if truncated else ids
    if len(ids) < 2:
        raise ValueError(f"--data: {source!r} gave fewer than 2 tokens")
    nll, count = stream_nll(model, torch.tensor(ids), context, stride, batch_size, progress)
    text = tok.decode(ids, skip_special_tokens=True) if truncated else "".join(texts)
    n_bytes, n_words = len(text.encode("utf-8")), len(text.split())
    return {
        "tokens": count,
        "loss": nll / count,
        "ppl": math.exp(nll / count),
        # tokenizer-independent: comparable across vocabularies (lm-evaluation-harness reports these too)
        "bits_per_byte": nll / n_bytes / math.log(2),
        "word_ppl": math.exp(nll / max(1, n_words)),
        "context": context,
        "stride": stride,
    }
