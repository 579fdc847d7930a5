"""How much readable text the installed distributions hold, by file kind: what a corpus of installed
packages could reach beyond `python-packages` (which takes .py, .md, .rst and .txt).

    python benchmarks/corpus_probe.py --out benchmarks/results/lm/corpus_probe.json

Every file of every distribution whose suffix is in SUFFIXES, kept by `python-packages`' own walk
(`package_texts`: its filter, code rules for every kind but prose, and exact de-duplication), counted in
characters and files per suffix. No tokenizer: divide by the characters per token of a prepared corpus
(`meta.json`) for an estimate.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from ramnet.files import write_text_atomic
from ramnet.lm.corpus import PROSE_SUFFIXES, package_distributions, package_texts
from ramnet.provenance import environment

SUFFIXES = PROSE_SUFFIXES | {".py", ".pyi", ".pyx", ".pxd", ".h", ".hpp", ".hh", ".hxx", ".cuh", ".inl", ".c", ".cc", ".cpp",
                    ".cxx", ".cu", ".ipynb", ".js", ".ts", ".html", ".tex", ".sh", ".cmake", ".toml", ".yaml", ".yml",
                    ".json"}


def count(distributions) -> dict[str, list[int]]:
    """``{suffix: [files, characters]}`` of the readable, distinct files, largest first."""
    chars, files = collections.Counter(), collections.Counter()
    for suffix, text in package_texts(SUFFIXES, distributions):
        chars[suffix] += len(text)
        files[suffix] += 1
    return {suffix: [files[suffix], n] for suffix, n in chars.most_common()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSON to write")
    args = parser.parse_args()
    distributions = package_distributions()
    by_suffix = count(distributions)
    result = {"meta": dict(environment("cpu"), distributions=len(distributions)), "by_suffix": by_suffix,
              "total_chars": sum(n for _, n in by_suffix.values())}
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["by_suffix"]), "total", result["total_chars"])


if __name__ == "__main__":
    main()
