"""``ramnet trace``: the memory-access trace of a checkpoint on a text or an MQAR batch (docs/trace.md)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..cli_support import add_verbosity, reports_errors

log = logging.getLogger(__name__)


def _budgets(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--budgets must be comma-separated fractions of M, e.g. 0.05,0.1,0.25, got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise ValueError(f"--budgets must be fractions of M in (0, 1], got {text!r}")
    return values


def input_ids_of(args: argparse.Namespace, tokenizer, vocab_size: int):
    """``[B, T]`` ids: the text (``--text``, ``--text-file``; '-' reads standard input), tokenised with the
    checkpoint's tokenizer after its BOS token as `ramnet generate` does, or an MQAR batch (``--mqar``)."""
    import torch

    given = [x for x in (args.text, args.text_file, args.mqar) if x is not None]
    if len(given) != 1:
        raise ValueError("give exactly one input: --text TEXT, --text-file FILE or --mqar L,N[,B]")
    if args.mqar is not None:
        from ..mqar.data import generate

        try:
            parts = [int(x) for x in args.mqar.split(",")]
            seq_len, pairs, batch = (parts + [1])[:3] if len(parts) in (2, 3) else (None, None, None)
        except ValueError:
            seq_len = None
        if seq_len is None:
            raise ValueError(f"--mqar must be L,N or L,N,B (sequence length, key-value pairs, sequences), "
                             f"got {args.mqar!r}")
        inputs, _ = generate(batch, seq_len, pairs, vocab_size=vocab_size, seed=args.seed)
        return inputs
    if args.text_file is not None:
        text = sys.stdin.read() if args.text_file == "-" else Path(args.text_file).read_text()
    else:
        text = args.text
    if tokenizer is None:
        raise ValueError("the checkpoint has no tokenizer to read a text with: use --mqar")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if not ids:
        raise ValueError("the text is empty")
    if args.max_tokens and len(ids) > args.max_tokens:
        ids = ids[:args.max_tokens]
    return torch.tensor([ids])


@reports_errors("trace", also=(ImportError,))
def cmd_trace(args: argparse.Namespace) -> int:
    from ..devices import resolve_device
    from ..lm.cli import model_arg
    from ..lm.evaluate import load
    from ..models import RAMNetConfig
    from ..provenance import environment
    from .core import parse_indices, trace_model
    from .report import NO_MATPLOTLIB, format_table, has_matplotlib

    budgets = _budgets(args.budgets)
    layers, heads = parse_indices(args.layers, "--layers"), parse_indices(args.heads, "--heads")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.chunk is not None and args.chunk < 1:
        raise ValueError(f"--chunk must be >= 1, got {args.chunk}")
    device = resolve_device(args.device)
    path = model_arg("trace", args.model)
    model, tok = load(path, device)
    if model.config.model_type != RAMNetConfig.model_type:
        raise ValueError(f"ramnet trace needs a RAM-Net checkpoint, got model_type {model.config.model_type!r}")
    ids = input_ids_of(args, tok, model.config.vocab_size)
    plot = not args.no_plot
    if plot and not has_matplotlib():
        log.warning(f"{NO_MATPLOTLIB}; the table and the JSON are written, the plot is not")
        plot = False
    meta = dict(environment(device), model=path, input="mqar " + args.mqar if args.mqar else
                ("text" if args.text is not None else f"file {args.text_file}"), tokens=int(ids.shape[1]),
                sequences=int(ids.shape[0]))
    result = trace_model(model, ids, Path(args.out), layers=layers, heads=heads, budgets=budgets,
                         chunk_size=args.chunk, include_slots=not args.no_slots, plot=plot, meta=meta)
    print(format_table(result["summary"]))
    print(f"[{result['seconds']:.1f} s; wrote {', '.join(result['files'])}]", file=sys.stderr)
    return 0


def add_trace_command(sub) -> None:
    """Adds ``ramnet trace`` to the ``ramnet`` parser's subparsers."""
    trace = sub.add_parser(
        "trace", help="memory-access trace of a RAM-Net checkpoint: slots per token, reuse distances, cache hit rates",
        description="Records the K write and K read slots of every token in each RAM layer and head (the RAM-Net "
                    "paper's Fig. 5), plots them, and from the trace computes reuse distances and the hit rates of "
                    "LRU, LFU and optimal (Belady) slot caches at budgets given as fractions of M. Writes "
                    "OUT/trace.png and OUT/trace.json and prints a table.")
    trace.add_argument("--model", required=True,
                       help="checkpoint or save_pretrained directory, or a run directory (its latest checkpoint)")
    trace.add_argument("--text", help="the text to read")
    trace.add_argument("--text-file", help="a file to read ('-': standard input)")
    trace.add_argument("--mqar", metavar="L,N[,B]",
                       help="an MQAR batch instead of a text: B sequences (default 1) of length L with N key-value pairs")
    trace.add_argument("--max-tokens", type=int, default=2048, help="trace the first N tokens of the text (default 2048)")
    trace.add_argument("--layers", default="all", help="RAM layers to trace, e.g. 0,3 (default all)")
    trace.add_argument("--heads", default="all", help="heads to trace, e.g. 0,1 (default all)")
    trace.add_argument("--budgets", default="0.05,0.1,0.25,0.5",
                       help="cache sizes as fractions of M (slots per head), default 0.05,0.1,0.25,0.5")
    trace.add_argument("--chunk", type=int, help="read the input in chunks of N tokens through the cache (long texts)")
    trace.add_argument("--out", default="trace", help="output directory (default ./trace)")
    trace.add_argument("--no-plot", action="store_true", help="no PNG")
    trace.add_argument("--no-slots", action="store_true", help="leave the per-token slots out of the JSON (summary only)")
    trace.add_argument("--seed", type=int, default=0, help="seed of the MQAR batch (default 0)")
    trace.add_argument("--device", default="auto")
    add_verbosity(trace)
    trace.set_defaults(func=cmd_trace)


__all__ = ["add_trace_command", "cmd_trace"]
