"""Tokenizers: any Hugging Face tokenizer (a hub name, a local directory or a tokenizer.json), or a
byte-level BPE trained on the corpus with the `tokenizers` library.

Everything is handed around as a `PreTrainedTokenizerFast`, so that it saves next to the model
(`save_pretrained`) and `AutoTokenizer` (and so lm-evaluation-harness) loads it from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
KNOWN_EOS = (EOS, "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")


def train_bpe(texts: Iterable[str], vocab_size: int, progress: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's scheme: every byte is a token, so any text encodes) with one special
    token, `<|endoftext|>`, that separates documents and serves as BOS, EOS and padding. `progress`:
    the tokenizers library's progress bars (shown on a terminal)."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes and <|endoftext|>), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def load_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A Hugging Face tokenizer from a tokenizer.json file, a local directory or a hub name."""
    path = Path(name)
    if path.suffix == ".json":
        if not path.is_file():
            raise ValueError(f"tokenizer: no such file {path}")
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
        # A bare tokenizer.json does not say which token ends a text: take the usual names.
        eos = next((t for t in KNOWN_EOS if tok.convert_tokens_to_ids(t) not in (None, tok.unk_token_id)), None)
        if eos is None:
            raise ValueError(f"tokenizer: {path} has none of the usual EOS tokens {KNOWN_EOS}; pass its directory instead")
        tok.eos_token = eos
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise ValueError(f"tokenizer: cannot load {name!r} (a tokenizer.json, a directory or a hub name): {err}") from err
    if not tok.is_fast:
        raise ValueError(f"tokenizer: {name!r} has no fast (Rust) version, which data preparation needs")
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer: {name!r} has no EOS token to separate documents with")
    return tok


def encode_batch(tok: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    """Token ids without BOS/EOS (the caller adds the separators); parallel in Rust."""
    return [e.ids for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
