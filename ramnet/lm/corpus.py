"""Text sources: the built-in offline corpus, local files and directories, and Hugging Face datasets
(streamed). Each yields documents (strings) in a fixed order.

The built-in corpus, ``python-docs``, is the English documentation that ships inside every CPython:
the language reference and library topics that `help()` shows (``pydoc_data.topics``, 79 topics and
~0.47M characters in 3.11) and the docstrings of the standard library's modules (~1.4M characters
in 3.11). It is real prose written by people, it is present on any machine that has Python (so
nothing is downloaded), and it is large enough for a CPU model to learn more than unigram
statistics. Its exact content follows the Python version.

The second built-in corpus, ``python-stdlib``, is the source code of the standard library, tests
included (one document per .py file; ~1,800 files and ~32M characters in 3.11, about 10M BPE
tokens): offline text big enough for a GPU model, for comparisons on machines that cannot reach
the Hugging Face hub.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

BUILTIN = ("python-docs", "python-stdlib")
# name: (dataset, config, text column). WikiText as whole articles (the per-line original would put a
# separator after every line); it is also what lm-evaluation-harness scores for "wikitext".
HF_ALIASES = {
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", "text"),
    "wikitext-103": ("EleutherAI/wikitext_document_level", "wikitext-103-raw-v1", "page"),
    "wikitext-2": ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "page"),
}
TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".jsonl"}
# Skipped parts of the standard library: tests (code and data, little prose), installed packages,
# and the topics module (already taken whole, and a single huge literal).
_SKIP_DIRS = {"test", "tests", "site-packages", "dist-packages", "__pycache__", "pydoc_data", "idle_test"}
_MIN_DOCSTRING_WORDS = 20  # shorter ones are mostly "Return x." one-liners


def python_docs() -> Iterator[str]:
    """The built-in corpus: one document per pydoc topic, then one per stdlib module (its docstrings)."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):  # e.g. files written for another Python version
            continue
        docs = [
            doc
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and (doc := ast.get_docstring(node)) and len(doc.split()) >= _MIN_DOCSTRING_WORDS
        ]
        if docs:
            yield "\n\n".join(docs)


def python_stdlib() -> Iterator[str]:
    """The built-in code corpus: every .py file of the standard library (tests included), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if not {"site-packages", "dist-packages", "__pycache__"}.intersection(path.relative_to(root).parts[:-1]):
            yield path.read_text(encoding="utf-8", errors="replace")


def _files(path: Path, text_column: str) -> Iterator[str]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"source: no text files ({', '.join(sorted(TEXT_SUFFIXES))}) under {path}")
    for file in files:
        if file.suffix == ".jsonl":  # one JSON object per line, the text under `text_column`
            with file.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)[text_column]
                        except (json.JSONDecodeError, KeyError, TypeError) as err:
                            raise ValueError(f"source: {file}:{n} is not a JSON object with a {text_column!r} field") from err
        else:
            yield file.read_text(encoding="utf-8", errors="replace")


def _hf(name: str, config: str | None, split: str, text_column: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as err:
        raise ValueError(f"source {name!r}: Hugging Face datasets need `pip install datasets` (or ramnet[data])") from err
    stream = datasets.load_dataset(name, config, split=split, streaming=True)
    for row in stream:
        if text_column not in row:
            raise ValueError(f"source {name!r}: rows have no {text_column!r} column (they have {sorted(row)}); pass --text-column")
        yield row[text_column]


def documents(source: str, split: str = "train", text_column: str | None = None) -> Iterator[str]:
    """Documents of `source`: a built-in corpus name, a file or directory, a dataset alias
    (`fineweb-edu`, `wikitext-103`, `wikitext-2`) or `hf:NAME[:CONFIG]`. `split` and `text_column`
    apply to Hugging Face datasets (`text_column` to .jsonl files too)."""
    if source == "python-docs":
        return python_docs()
    if source == "python-stdlib":
        return python_stdlib()
    if source in HF_ALIASES:
        name, config, column = HF_ALIASES[source]
        return _hf(name, config, split, text_column or column)
    if source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        return _hf(name, config or None, split, text_column or "text")
    path = Path(source)
    if path.exists():
        return _files(path, text_column or "text")
    raise ValueError(
        f"source {source!r} is neither a built-in corpus ({', '.join(BUILTIN)}), an existing file or directory, "
        f"a dataset alias ({', '.join(HF_ALIASES)}) nor hf:NAME[:CONFIG]"
    )


def held_out(index: int, val_every: int) -> bool:
    """Every `val_every`-th document (the last of each group) is held out; works on streams."""
    return val_every > 0 and index % val_every == val_every - 1
