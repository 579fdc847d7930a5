"""Figures from the JSONL results: accuracy vs state size, and the two RAM-Net ablations."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .report import best_runs, model_families, pareto_frontier, run_group, shown_rows, variant_labels


NO_MATPLOTLIB = "the figures need matplotlib, which is not installed: pip install 'ramnet[plot]'"


def has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def plot_results(rows: list[dict], out_dir: Path) -> list[Path]:
    """Write one PNG per kind of result present in ``rows``; return their paths.

    - ``mqar_accuracy_vs_state.png``: for every non-ablation preset, one panel of the best-lr
      average accuracy of each (model, d_model) against its total state size (floats, log x),
      one line per model through its d_models (the RAM-Net paper's MQAR figure), the Pareto
      frontier of all its points marked (``ramnet.mqar.report.pareto_frontier``).
    - ``mqar_frontier.png``: for every non-ablation preset, one panel per d_model: each model family
      (``model_families``: RAM-Net's M = 16 ... 4096 are one line) a line through its configurations
      against state size (log x), the panel's Pareto frontier marked.
    - ``mqar_ablation_u.png`` / ``mqar_ablation_m.png``: accuracy against U at fixed M, and
      against M at fixed U (the paper's Fig. 4), one line per d_model.

    The two-stage protocol's screen runs are left out where their model has final runs
    (``shown_rows``).
    """
    if not has_matplotlib():
        raise ImportError(NO_MATPLOTLIB)
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    best = best_runs(shown_rows(rows))
    labels = variant_labels(best, across_d_models=True)  # a line runs through the d_models
    written = []
    main = [r for r in best if not r.get("ablation") and r["state_size"] is not None]
    if main:
        presets = list(dict.fromkeys(r["preset"] for r in main))
        fig, axes = plt.subplots(1, len(presets), figsize=(8 * len(presets), 5.5), squeeze=False)
        for ax, preset in zip(axes[0], presets):
            # One line per model and variant (other epochs, seed or protocol: never one line).
            lines = list(dict.fromkeys((r["model"], labels[run_group(r)]) for r in main if r["preset"] == preset))
            # A colour per line (tab10 repeats after ten); RAM-Net's own models solid, baselines dashed.
            colors = plt.get_cmap("tab10" if len(lines) <= 10 else "tab20").colors
            for i, (model, variant) in enumerate(lines):
                pts = sorted((r["state_size"], r["avg_accuracy"], r["d_model"]) for r in main
                             if r["preset"] == preset and r["model"] == model and labels[run_group(r)] == variant)
                style = "o-" if model.startswith(("ramnet", "hybrid")) else "s--"
                line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
                                label=f"{model} ({variant})" if variant else model, color=colors[i % len(colors)])
                for x, y, d in pts:
                    ax.annotate(f"d={d}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                color=line.get_color())
            _mark_frontier(ax, [r for r in main if r["preset"] == preset])
            ax.set(xscale="log", ylim=(-0.02, 1.06), xlabel="state size (floats, all layers)",
                   ylabel="average accuracy (7 test settings)", title=f"MQAR: {preset}")
            ax.margins(x=0.12)  # room for the labels of the outermost points
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / "mqar_accuracy_vs_state.png"))
        written.append(_frontier_figure(plt, main, labels, out_dir / "mqar_frontier.png"))
    for kind, xlabel in (("U", "U (partitions) at M = d_p^U fixed"), ("M", "M = d_p^U memory slots at U fixed")):
        abl = [r for r in best if r.get("ablation") == kind]
        if not abl:
            continue
        fig, ax = plt.subplots(figsize=(6, 4.5))
        # One line per d_model and variant: the variants of each of the ablation's models, labelled
        # by their epochs and seed (the models of one line differ only in U or M).
        variants = variant_labels(abl)
        for d_model, variant in sorted({(r["d_model"], variants[run_group(r)]) for r in abl}):
            pts = sorted((_ram_x(r, kind), r["avg_accuracy"]) for r in abl
                         if r["d_model"] == d_model and variants[run_group(r)] == variant)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-",
                    label=f"d_model {d_model}" + (f" ({variant})" if variant else ""))
        ax.set(xscale="log", ylim=(-0.02, 1.02), xlabel=xlabel, ylabel="average accuracy (7 test settings)",
               title=f"RAM-Net ablation over {kind}")
        if kind == "U":
            xs = sorted({_ram_x(r, kind) for r in abl})
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / f"mqar_ablation_{kind.lower()}.png"))
    return written


def _mark_frontier(ax, rows: list[dict]) -> None:
    """The Pareto frontier of ``rows``: a black step line through its points, ringed."""
    front = pareto_frontier(rows)
    if not front:
        return
    xs, ys = [r["state_size"] for r in front], [r["avg_accuracy"] for r in front]
    ax.plot(xs, ys, color="black", linewidth=1.0, linestyle=":", drawstyle="steps-post", zorder=1)
    ax.plot(xs, ys, "o", markersize=11, markerfacecolor="none", markeredgecolor="black", zorder=1,
            label="Pareto frontier")


def _frontier_figure(plt, main: list[dict], labels: dict, path: Path) -> Path:
    """``mqar_frontier.png`` (see ``plot_results``): a row of d_model panels per preset."""
    presets = list(dict.fromkeys(r["preset"] for r in main))
    d_models = {p: sorted({r["d_model"] for r in main if r["preset"] == p}) for p in presets}
    cols = max(len(ds) for ds in d_models.values())
    fig, axes = plt.subplots(len(presets), cols, figsize=(6.5 * cols, 5.5 * len(presets)), squeeze=False)
    family = model_families(main)
    lines = list(dict.fromkeys((family[run_group(r)], labels[run_group(r)]) for r in main))
    colors = plt.get_cmap("tab10" if len(lines) <= 10 else "tab20").colors
    color = {line: colors[i % len(colors)] for i, line in enumerate(lines)}  # a line's colour in every panel
    for row_axes, preset in zip(axes, presets):
        for ax, d_model in zip(row_axes, d_models[preset]):
            panel = [r for r in main if r["preset"] == preset and r["d_model"] == d_model]
            for line in dict.fromkeys((family[run_group(r)], labels[run_group(r)]) for r in panel):
                pts = sorted(((r["state_size"], r["avg_accuracy"], r["model"]) for r in panel
                              if (family[run_group(r)], labels[run_group(r)]) == line))
                name, variant = line
                style = "o-" if name.startswith(("ramnet", "hybrid")) else "s--"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color[line],
                        label=f"{name} ({variant})" if variant else name)
                if len(pts) > 1:  # name the configurations along a line
                    for x, y, model in pts:
                        ax.annotate(model, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=6,
                                    color=color[line])
            _mark_frontier(ax, panel)
            ax.set(xscale="log", ylim=(-0.02, 1.06), xlabel="state size (floats, all layers)",
                   ylabel="average accuracy (7 test settings)", title=f"MQAR {preset}: d_model {d_model}")
            ax.margins(x=0.12)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in row_axes[len(d_models[preset]):]:
            ax.set_visible(False)
    return _save(fig, path)


def _ram_x(row: dict, kind: str) -> int:
    kwargs = row["mixer"]["kwargs"]
    return kwargs["num_partitions"] if kind == "U" else kwargs["partition_dim"] ** kwargs["num_partitions"]


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
