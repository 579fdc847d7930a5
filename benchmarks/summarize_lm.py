"""Held-out perplexity, throughput and memory of `ramnet train` runs, side by side: a markdown
table and a plot of held-out perplexity against training tokens.

    python benchmarks/summarize_lm.py --out benchmarks/results/lm/small_stdlib \\
        RAM-Net=runs/small/metrics.jsonl Transformer++=runs/small-transformer/metrics.jsonl

writes small_stdlib.md and small_stdlib.png. A metrics file that several runs appended to (a run
restarted from scratch in the same out_dir) is read from its last start: where the step count
falls back.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from ramnet.files import write_text_atomic


def last_run(path: Path) -> list[dict]:
    """The rows of the last run in a metrics.jsonl (a resumed run continues its steps, a new one restarts)."""
    rows: list[dict] = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if rows and row["step"] <= rows[-1]["step"]:
            rows = []
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no metrics rows")
    return rows


def summarize(rows: list[dict]) -> dict:
    """Final and best held-out perplexity, tokens seen, median tokens/s (the first logged interval,
    with compilation and autotuning in it, left out) and peak memory."""
    evals = [(r["tokens"], r["val/ppl"]) for r in rows if "val/ppl" in r]
    speeds = [r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r][1:]
    memory = [r["train/peak_memory_gib"] for r in rows if r.get("train/peak_memory_gib") is not None]
    return {"steps": rows[-1]["step"], "tokens": rows[-1]["tokens"], "evals": evals,
            "final_ppl": evals[-1][1] if evals else None, "best_ppl": min((p for _, p in evals), default=None),
            "tokens_per_s": statistics.median(speeds) if speeds else None,
            "peak_memory_gib": max(memory) if memory else None}


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(summaries: dict[str, dict]) -> str:
    lines = ["| run | steps | tokens | held-out ppl (final) | best | tokens/s (median) | peak memory (GiB) |",
             "|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        lines.append(f"| {name} | {_fmt(s['steps'], 'd')} | {s['tokens']:,} | {_fmt(s['final_ppl'], '.2f')} | "
                     f"{_fmt(s['best_ppl'], '.2f')} | {_fmt(s['tokens_per_s'], ',.0f')} | "
                     f"{_fmt(s['peak_memory_gib'], '.2f')} |")
    return "\n".join(lines) + "\n"


def plot(summaries: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, s in summaries.items():
        if s["evals"]:
            ax.plot([t / 1e6 for t, _ in s["evals"]], [p for _, p in s["evals"]], "o-", label=name)
    ax.set(yscale="log", xlabel="training tokens (millions)", ylabel="held-out perplexity", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=path/to/metrics.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="path stem: writes STEM.md and STEM.png")
    parser.add_argument("--title", default="held-out perplexity")
    args = parser.parse_args(argv)
    summaries = {}
    for item in args.runs:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"runs are NAME=path/to/metrics.jsonl, got {item!r}")
        summaries[name] = summarize(last_run(Path(path)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out.with_suffix(".md"), table(summaries))
    plot(summaries, args.out.with_suffix(".png"), args.title)
    print(table(summaries), end="")
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
