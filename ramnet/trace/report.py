"""The outputs of ``ramnet trace``: the Fig. 5 style plot, the JSON file and the terminal table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from .record import LayerTrace

NO_MATPLOTLIB = "the plot needs matplotlib, which is not installed: pip install 'ramnet[plot]'"
WRITE_COLOUR, READ_COLOUR = "tab:red", "tab:green"  # the paper's Fig. 5: writes red, reads green


def has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


MIN_MARKER = 1.0


def plot_traces(traces: list[LayerTrace], heads: list[int], path: Path, sequence: int = 0,
                title: str | None = None) -> Path:
    """One panel per (layer, head): slot (y) against token (x), the K write slots of every token in red
    and its K read slots in green (the RAM-Net paper's Fig. 5), for sequence ``sequence`` of the batch.
    Rows are layers, columns heads."""
    if not has_matplotlib():
        raise ImportError(NO_MATPLOTLIB)
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows, cols = len(traces), len(heads)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 0.6, 2.6 * rows + 0.8), squeeze=False,
                             sharex=True)
    for r, trace in enumerate(traces):
        tokens = np.arange(trace.num_tokens)
        t_k = np.repeat(tokens, trace.topk)
        # Marker area in points^2: smaller for longer traces, but never under MIN_MARKER (Agg draws nothing
        # for an edgeless square of 0.3: the 2048-token, K 8 trace of `small` came out as empty panels).
        marker = max(MIN_MARKER, min(6.0, 4000.0 / max(1, trace.num_tokens * trace.topk)))
        for c, h in enumerate(heads):
            ax = axes[r][c]
            ax.scatter(t_k, trace.write_idx[sequence, :, h].reshape(-1), s=marker, c=WRITE_COLOUR, marker="s",
                       linewidths=0, rasterized=True)
            ax.scatter(t_k, trace.read_idx[sequence, :, h].reshape(-1), s=marker, c=READ_COLOUR, marker="s",
                       linewidths=0, alpha=0.7, rasterized=True)
            ax.set_ylim(-0.5, trace.memory_slots - 0.5)
            ax.set_title(f"layer {trace.layer}, head {h}" + (" (CAPE)" if trace.cape[h] else ""), fontsize=9)
            if c == 0:
                ax.set_ylabel(f"slot (M = {trace.memory_slots})")
            if r == rows - 1:
                ax.set_xlabel("token")
            ax.tick_params(labelsize=7)
    handles = [Line2D([], [], marker="s", linestyle="", color=WRITE_COLOUR, label="write"),
               Line2D([], [], marker="s", linestyle="", color=READ_COLOUR, label="read")]
    fig.legend(handles=handles, loc="upper right", ncol=2, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def format_table(summary: dict) -> str:
    """One line per (layer, head), averaged over the sequences: distinct slots touched, cold accesses,
    median and p90 reuse distance, then the LRU hit rate (%) at each budget; LFU and the Belady optimum
    summed up at the end."""
    fractions = summary["budgets"]
    heads = summary["heads"]
    budget_cols = [f"LRU@{100 * f:g}%" for f in fractions]
    header = ["layer", "head", "touched", "cold%", "reuse p50", "reuse p90", *budget_cols]
    lines = []
    for entry in summary["per_head"]:
        lines.append([str(entry["layer"]), str(entry["head"]), f"{entry['distinct_slots']:.0f}",
                      _pct(entry["cold_fraction"]),
                      "-" if entry["reuse_p50"] is None else f"{entry['reuse_p50']:.0f}",
                      "-" if entry["reuse_p90"] is None else f"{entry['reuse_p90']:.0f}",
                      *(_pct(x) for x in entry["hit_rate"]["lru"])])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    out += ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in lines]
    mean = summary["mean_hit_rate"]
    out.append("")
    out.append(f"M = {summary['memory_slots']} slots per head, K = {summary['topk']}, {summary['tokens']} tokens x "
               f"{summary['sequences']} sequence(s), heads {heads}; cache sizes (slots per head) "
               f"{summary['cache_slots']} for budgets {[f'{100 * f:g}%' for f in fractions]} of M")
    for policy in ("lru", "lfu", "belady"):
        if policy in mean:
            out.append(f"mean hit rate, {policy.upper():6s}: " + ", ".join(
                f"{100 * f:g}% {_pct(x)}%" for f, x in zip(fractions, mean[policy])))
    if "mean_prefetch" in summary:
        out.append("LRU misses a prefetch of the last token's slots would have caught (% of accesses): " + ", ".join(
            f"{100 * f:g}% {_pct(x)}%" for f, x in zip(fractions, summary["mean_prefetch"])))
    if "mean_lru_prefetch" in summary:
        head = "LRU with that prefetch, simulated: hit rate (rows fetched ahead per token, share used): "
        out.append(head + ", ".join(
            f"{100 * f:g}% {_pct(x['hit_rate'])}% ({x['fetched_per_token']:.2f}, "
            f"{'-' if x['used'] is None else _pct(x['used']) + '%'})"
            for f, x in zip(fractions, summary["mean_lru_prefetch"])))
    return "\n".join(out)


__all__ = ["format_table", "has_matplotlib", "plot_traces"]
