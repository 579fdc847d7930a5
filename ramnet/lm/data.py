"""Token shards: `prepare` tokenises a corpus into memory-mapped files; `TokenData` and `Windows`
read fixed-length training windows from them.

Layout of a prepared directory::

    meta.json               splits, shard sizes, dtype, vocabulary size, largest token id, EOS id, unigram entropy
    tokenizer/              the tokenizer (save_pretrained), copied into every checkpoint
    train-00000.bin ...     raw token ids (uint16 when the vocabulary fits, else uint32),
    val-00000.bin ...       each document followed by EOS

Documents go to `val` one in `val_every` (see `corpus.held_out`), so a stream needs no second pass.
"""

from __future__ import annotations

import json
import re
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .corpus import documents, held_out, python_packages_manifest
from .tokenizer import encode_batch, load_tokenizer, train_bpe

SPLITS = ("train", "val")
_BATCH_DOCS = 512


def _bpe_texts(source: str, split: str, text_column: str | None, val_every: int, max_chars: int, bar=None):
    """The training documents that the BPE learns from, up to `max_chars` characters (counted on `bar`)."""
    seen = 0
    for i, doc in enumerate(documents(source, split, text_column)):
        if held_out(i, val_every):
            continue
        yield doc
        if bar is not None:
            bar.update(len(doc))
        seen += len(doc)
        if seen >= max_chars:
            return


class _ShardWriter:
    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[list] = []  # [file name, tokens]
        self.file = None
        self.tokens = self.documents = 0
        self.max_id = -1

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.file is None or self.shards[-1][1] == self.shard_tokens:
                self._next_shard()
            room = self.shard_tokens - self.shards[-1][1]
            part, ids = ids[:room], ids[room:]
            part.astype(self.dtype).tofile(self.file)
            self.max_id = max(self.max_id, int(part.max()))
            self.shards[-1][1] += len(part)
            self.tokens += len(part)

    def _next_shard(self) -> None:
        if self.file is not None:
            self.file.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.file = open(self.out / name, "wb")
        self.shards.append([name, 0])

    def close(self) -> dict:
        if self.file is not None:
            self.file.close()
        return {"shards": self.shards, "tokens": self.tokens, "documents": self.documents}


def default_data_dir(source: str = "python-docs", tokenizer: str = "bpe", vocab_size: int = 4096,
                     max_tokens: int | None = None, **_other) -> str:
    """Where `prepare` with these settings goes unless told otherwise: `data/SOURCE-TOKENIZER[-MAX]`,
    e.g. data/python-docs-bpe4k, data/fineweb-edu-llama-tokenizer-700M. `ramnet data prepare` writes
    there by default and a training config without `data` reads from there (the settings of its
    `prepare`), so the two agree; the other settings of `prepare` (`_other`) do not change the name."""
    def clean(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "data"

    name = clean(Path(source.rstrip("/")).name if Path(source).exists() else source.replace("hf:", ""))
    if tokenizer == "bpe":
        tok = f"bpe{vocab_size // 1024}k" if vocab_size % 1024 == 0 else f"bpe{vocab_size}"
    else:  # a hub name, a directory or a tokenizer.json: its last meaningful component
        path = Path(tokenizer.rstrip("/"))
        tok = clean(path.parent.name if path.suffix == ".json" and path.parent.name else path.name)
    size = ""
    if max_tokens is not None:
        for unit, scale in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
            if max_tokens >= scale and max_tokens % scale == 0:
                size = f"-{max_tokens // scale}{unit}"
                break
        else:
            size = f"-{max_tokens}"
    return f"data/{name}-{tok}{size}"


def prepare(
    out_dir: str | Path,
    source: str = "python-docs",
    tokenizer: str = "bpe",
    vocab_size: int = 4096,
    split: str = "train",
    text_column: str | None = None,
    val_every: int = 20,
    max_tokens: int | None = None,
    shard_tokens: int = 2**28,
    bpe_max_chars: int = 200_000_000,
    progress: bool = True,
) -> dict:
    """Tokenise `source` into `out_dir` and return its meta.json.

    `tokenizer` is "bpe" (a byte-level BPE of `vocab_size` trained on the training documents, at most
    `bpe_max_chars` characters of them) or a Hugging Face tokenizer (hub name, directory or
    tokenizer.json). `max_tokens` caps the training split (the stream is cut there). Written to
    `out_dir.tmp` and renamed when complete, so a directory with a meta.json is always whole."""
    out = Path(out_dir)
    if (out / "meta.json").exists():
        raise ValueError(f"out_dir {out} already holds prepared data (remove it to prepare again)")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = _prepare_into(tmp, source, tokenizer, vocab_size, split, text_column, val_every, max_tokens,
                             shard_tokens, bpe_max_chars, progress)
    except BaseException:  # a failed (or interrupted) preparation leaves nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)  # a directory without meta.json: an earlier broken run
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return meta


def _prepare_into(tmp: Path, source, tokenizer, vocab_size, split, text_column, val_every, max_tokens, shard_tokens,
                  bpe_max_chars, progress) -> dict:
    """`prepare`'s work, written into `tmp`; returns the meta that it wrote there."""
    if tokenizer == "bpe":
        # Reading the corpus gets a bar here; the merges get the tokenizers library's own (on a terminal).
        with tqdm(desc=f"BPE {vocab_size}: reading {source}", unit=" char", unit_scale=True,
                  disable=not progress) as bar:
            texts = _bpe_texts(source, split, text_column, val_every, bpe_max_chars, bar)
            tok = train_bpe(texts, vocab_size, progress=progress)
    else:
        tok = load_tokenizer(tokenizer)
    tok.save_pretrained(tmp / "tokenizer")
    vocab = len(tok)
    dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)
    eos = tok.eos_token_id
    writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
    counts = np.zeros(vocab, dtype=np.int64)  # train-split unigram counts

    docs = enumerate(documents(source, split, text_column))
    bar = tqdm(desc=f"tokenising {source}", unit=" tok", unit_scale=True, disable=not progress)
    while max_tokens is None or writers["train"].tokens < max_tokens:
        batch = list(islice(docs, _BATCH_DOCS))
        if not batch:
            break
        for (i, _), ids in zip(batch, encode_batch(tok, [d for _, d in batch])):
            writer = writers["val" if held_out(i, val_every) else "train"]
            ids = np.asarray(ids + [eos], dtype=np.int64)
            if writer is writers["train"] and max_tokens is not None:
                ids = ids[: max_tokens - writer.tokens]
            if not len(ids):
                continue
            writer.write(ids)
            writer.documents += 1
            if writer is writers["train"]:
                counts += np.bincount(ids, minlength=vocab)
            bar.update(len(ids))
    bar.close()

    if writers["train"].tokens < 2:
        raise ValueError(f"source {source!r} gave no training text")
    p = counts[counts > 0] / counts.sum()
    meta = {
        "source": source,
        "split": split,
        "tokenizer": tokenizer if tokenizer != "bpe" else f"bpe (byte-level, trained on the corpus, {vocab} tokens)",
        "vocab_size": vocab,
        "eos_token_id": eos,
        "dtype": dtype.name,
        "max_token_id": max(w.max_id for w in writers.values()),
        "val_every": val_every,
        # H = -sum p log p over the training tokens, in nats: the loss of the best context-free model.
        "unigram_entropy": float(-(p * np.log(p)).sum()),
        "splits": {s: w.close() for s, w in writers.items()},
    }
    if source == "python-packages":  # its content is whatever is installed: say what that was
        meta["distributions"] = python_packages_manifest()
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


DTYPES = ("uint16", "uint32")


def _meta_error(meta_file: Path, what: str) -> ValueError:
    return ValueError(f"data: {meta_file} is malformed: {what}; prepare the data again (`ramnet data prepare`)")


def read_meta(path: Path) -> dict:
    """The meta.json of prepared directory `path`, checked for the fields that reading the shards needs."""
    meta_file = path / "meta.json"
    if not meta_file.exists():
        raise ValueError(f"data: {path} is not a prepared data directory (no meta.json); run `ramnet data prepare`")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _meta_error(meta_file, f"not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise _meta_error(meta_file, "not a JSON object")
    vocab = meta.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise _meta_error(meta_file, f"`vocab_size` must be a positive integer, got {vocab!r}")
    if meta.get("dtype") not in DTYPES:
        raise _meta_error(meta_file, f"`dtype` must be one of {', '.join(DTYPES)}, got {meta.get('dtype')!r}")
    splits = meta.get("splits")
    if not isinstance(splits, dict) or set(SPLITS) - set(splits):
        raise _meta_error(meta_file, f"`splits` must hold {' and '.join(SPLITS)}")
    for split in SPLITS:
        info = splits[split]
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list) or not all(
            isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and Path(e[0]).name == e[0] and e[0]
            and isinstance(e[1], int) and not isinstance(e[1], bool) and e[1] >= 0 for e in shards
        ):
            raise _meta_error(meta_file, f"`splits.{split}.shards` must be a list of [file name, token count]")
        if info.get("tokens") != sum(n for _, n in shards):
            raise _meta_error(meta_file, f"`splits.{split}.tokens` ({info.get('tokens')!r}) is not the sum of its shards' "
                                         f"token counts ({sum(n for _, n in shards)})")
    top = meta.get("max_token_id")
    if top is not None and (not isinstance(top, int) or top >= vocab):
        raise ValueError(f"data: {meta_file} says the shards hold token id {top!r}, not below its vocab_size {vocab}")
    return meta


class TokenData:
    """A prepared directory: its meta, tokenizer and memory-mapped shards. Opening it checks meta.json
    and that every shard it lists is there with the size that it says; `Windows.batch` checks the ids
    that it reads against the vocabulary."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        dtype = np.dtype(self.meta["dtype"])
        self.shards, self.shard_files = {}, {}
        for s, info in self.meta["splits"].items():
            if s not in SPLITS:
                continue
            self.shards[s], self.shard_files[s] = [], []
            for name, n in info["shards"]:
                file = self.path / name
                if not file.is_file():
                    raise ValueError(f"data: {file} is missing (meta.json lists it in the {s} split with {n} tokens)")
                size = file.stat().st_size
                if size != n * dtype.itemsize:
                    raise ValueError(f"data: {file} has {size} bytes, but meta.json says {n} {dtype.name} tokens "
                                     f"({n * dtype.itemsize} bytes): the shard is truncated or from another preparation")
                if n:
                    self.shards[s].append(np.memmap(file, dtype=dtype, mode="r", shape=(n,)))
                    self.shard_files[s].append(file)

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    def tokenizer(self):
        return load_tokenizer(str(self.path / "tokenizer"))


class Windows:
    """The non-overlapping windows of `seq_len + 1` tokens of one split (inputs and shifted targets),
    in a fixed order (`shuffle=False`) or in a new random order each epoch. Sample `pos` of the
    endless stream is a pure function of (seed, pos), so a resumed or sharded run reads exactly what
    an uninterrupted single process would."""

    def __init__(self, data: TokenData, split: str, seq_len: int, shuffle: bool, seed: int = 0):
        self.seq_len, self.shuffle, self.seed = seq_len, shuffle, seed
        self.shards, self.files, self.vocab_size = data.shards[split], data.shard_files[split], data.vocab_size
        per_shard = [(len(s) - 1) // seq_len for s in self.shards]
        self.starts = np.cumsum([0] + per_shard)
        if self.starts[-1] == 0:
            raise ValueError(f"data: the {split} split of {data.path} has fewer than seq_len + 1 = {seq_len + 1} tokens")
        self._perm_epoch, self._perm = -1, None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _window(self, pos: int) -> int:
        epoch, i = divmod(pos, len(self))
        if not self.shuffle:
            return i
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self), generator=g).numpy(), epoch
        return int(self._perm[i])

    def batch(self, positions) -> torch.Tensor:
        """Windows at the given stream positions, `[len(positions), seq_len + 1]` int64."""
        rows = []
        for pos in positions:
            w = self._window(int(pos))
            shard = int(np.searchsorted(self.starts, w, side="right")) - 1
            start = (w - int(self.starts[shard])) * self.seq_len
            row = np.asarray(self.shards[shard][start : start + self.seq_len + 1], dtype=np.int64)
            if row.max() >= self.vocab_size:  # cheap: only the tokens read, which are in memory now
                bad = int(np.argmax(row >= self.vocab_size))
                raise ValueError(f"data: {self.files[shard]} holds token id {int(row[bad])} at token {start + bad}, "
                                 f"not below the vocabulary size {self.vocab_size} of meta.json")
            rows.append(row)
        return torch.from_numpy(np.stack(rows))
