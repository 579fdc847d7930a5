"""``ramnet mqar`` (train, evaluate, table, plot) and ``ramnet mqar plot`` (redraw from the JSONL)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli_support import reports_errors
from ..devices import resolve_device
from ..files import write_text_atomic
from .plot import NO_MATPLOTLIB, has_matplotlib, plot_results
from .presets import PRESETS, PROTOCOLS, MQARPreset, describe_cuts, get_preset, read_preset_file
from .report import format_table, load_rows, markdown_table, shown_rows
from .sweep import RunsFailed, run_preset


def add_mqar_commands(sub) -> None:
    """Add the ``mqar`` subcommand to the ``ramnet`` parser's subparsers."""
    mqar = sub.add_parser(
        "mqar", help="train and evaluate models on MQAR (multi-query associative recall)",
        description="Train the synthetic-task LM with each token mixer of a preset, sweep the lr, print "
                    "the best-lr table and plot accuracy vs state size. `ramnet mqar plot` redraws the "
                    "figures from the results file.")
    mqar.add_argument("--preset", default="quick", choices=list(PRESETS),
                      help="quick (default): a few CPU minutes; paper: the paper's protocol; ablation-u / "
                           "ablation-m: RAM-Net at fixed M over U, and over M at fixed U; hybrid: the "
                           "RAM-Net + sliding-window hybrid against its parts; forgetting: MQAR with keys "
                           "re-assigned, queries asking for the latest value (forgetting-quick: its CPU smoke run)")
    mqar.add_argument("--config", help="a JSON preset file instead of --preset (see --dump-config)")
    mqar.add_argument("--models", type=_csv(str), help="run only these models of the preset (comma-separated)")
    mqar.add_argument("--d-models", dest="d_models", type=_csv(int), help="override the d_model sweep")
    mqar.add_argument("--lrs", type=_csv(float), help="override the lr sweep (comma-separated)")
    mqar.add_argument("--epochs", type=int, help="override the number of epochs")
    mqar.add_argument("--seed", type=int, help="override the seed (model init and data)")
    mqar.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    mqar.add_argument("--jobs", type=int, default=1,
                      help="runs trained at once, each in its own process on the device (default 1)")
    mqar.add_argument("--protocol", default="full", choices=PROTOCOLS,
                      help="full (default): every lr at the preset's epochs; two-stage: every lr at "
                           "--screen-epochs, then the best lr and its neighbours at the preset's epochs")
    mqar.add_argument("--screen-epochs", dest="screen_epochs", type=int, default=4,
                      help="epochs of the two-stage protocol's first stage (default 4)")
    mqar.add_argument("--rerun", action="store_true",
                      help="run every run again, also those already in OUT/results.jsonl (default: skip them)")
    mqar.add_argument("--out", default="mqar_results", help="results folder (default: mqar_results)")
    mqar.add_argument("--dump-config", action="store_true", help="print the preset as JSON and exit")
    mqar_sub = mqar.add_subparsers(dest="mqar_command")
    plot = mqar_sub.add_parser("plot", help="draw the PNG figures from OUT/results.jsonl")
    # SUPPRESS: without --out here, `ramnet mqar --out DIR plot` keeps DIR.
    plot.add_argument("--out", default=argparse.SUPPRESS, help="results folder (default: mqar_results)")
    mqar.set_defaults(func=cmd_mqar)


def _csv(kind):
    """argparse type: a comma-separated list of ``kind``."""
    def parse(text: str):
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
    return parse


def preset_from_args(args: argparse.Namespace) -> MQARPreset:
    """The preset to run: a named one or a JSON file, with the command line's overrides."""
    preset = read_preset_file(args.config) if args.config else get_preset(args.preset)
    if args.models:
        unknown = [m for m in args.models if m not in preset.get("models", {})]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; this preset has: {', '.join(preset.get('models', {}))}")
        preset["models"] = {m: preset["models"][m] for m in args.models}
    for key in ("d_models", "lrs", "epochs", "seed"):
        value = getattr(args, key)
        if value is not None:
            preset[key] = value
    if args.lrs is not None and isinstance(preset.get("models"), dict):  # an explicit sweep replaces per-model ones
        for entry in preset["models"].values():
            if isinstance(entry, dict):
                entry.pop("lrs", None)
    return MQARPreset.from_dict(preset)


@reports_errors("mqar", also=(ImportError, FileNotFoundError))
def cmd_mqar(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.mqar_command == "plot":
        _report(load_rows(out / "results.jsonl"), out, plotting_only=True)  # without matplotlib: its error
        return 0
    preset = preset_from_args(args)
    if args.dump_config:
        print(json.dumps(preset.to_dict(), indent=1))
        return 0
    device = resolve_device(args.device)
    if not has_matplotlib():  # said before training, not after it
        print(f"ramnet mqar: warning: {NO_MATPLOTLIB}; the table is printed, the figures are not drawn",
              file=sys.stderr)
    print(f"MQAR preset {preset.name}: {preset.description}")
    print(f"device {device}, results appended to {out / 'results.jsonl'}")
    cuts = describe_cuts(preset, args.protocol, args.screen_epochs)
    if cuts:
        print(f"cut or changed from the {'forgetting preset' if preset.reassign else 'paper'} protocol:")
    for line in cuts:
        print(f"  {line}")
    try:
        run_preset(preset, out, device, jobs=args.jobs, protocol=args.protocol, screen_epochs=args.screen_epochs,
                   resume=not args.rerun)
    except RunsFailed as failure:  # the finished runs are in the results file: still tabled and drawn
        if (out / "results.jsonl").exists():  # absent when no run has ever finished here
            _report(load_rows(out / "results.jsonl"), out)
        print(f"ramnet mqar: error: {failure}", file=sys.stderr)
        return 1
    # The whole results file, not this invocation's rows: a re-run of one model must not redraw the
    # figure with its points alone.
    _report(load_rows(out / "results.jsonl"), out)
    return 0


def _report(rows: list[dict], out: Path, plotting_only: bool = False) -> None:
    """Print the best-lr table of ``rows`` (each run configuration apart: ``ramnet.mqar.report``),
    write it as Markdown to ``out/mqar_table.md`` and their figures to ``out`` (nothing for no rows).
    Without matplotlib, the tables only, unless the figures are the point (``plotting_only``:
    `ramnet mqar plot`), which then fails naming the extra. The two-stage protocol's screen runs of
    models with final runs are left out (``shown_rows``) and counted."""
    if rows:
        shown = shown_rows(rows)
        print(format_table(shown))
        if len(shown) < len(rows):
            print(f"({len(rows) - len(shown)} two-stage screen runs not shown: their models have final runs)")
        write_text_atomic(out / "mqar_table.md", markdown_table(rows))
        if not has_matplotlib() and not plotting_only:
            return
        for path in plot_results(rows, out):
            print(f"wrote {path}")
