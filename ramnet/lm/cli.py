"""`ramnet data prepare`, `ramnet train`, `ramnet eval ppl|harness` and `ramnet generate`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from ..cli_support import add_verbosity, main_process, reports_errors
from .config import PRESETS

log = logging.getLogger(__name__)


@reports_errors("data prepare")
def cmd_prepare(args: argparse.Namespace) -> int:
    from .data import default_data_dir, prepare

    out = args.out or default_data_dir(args.source, args.tokenizer, args.vocab_size, args.max_tokens)
    meta = prepare(
        out, source=args.source, tokenizer=args.tokenizer, vocab_size=args.vocab_size, split=args.split,
        text_column=args.text_column, val_every=args.val_every, max_tokens=args.max_tokens, shard_tokens=args.shard_tokens,
        progress=args.verbosity >= 0,
    )
    splits = ", ".join(f"{s} {info['tokens']:,} tokens / {info['documents']:,} documents" for s, info in meta["splits"].items())
    print(f"{out}: {splits}; vocabulary {meta['vocab_size']}; unigram entropy {meta['unigram_entropy']:.3f} nats")
    return 0


def check_train_config(config) -> None:
    """What `load_config` leaves to the trainer, checked before anything runs: the `model` keys, through
    the family's config class (`families.make_config`, which refuses unknown keys; the vocabulary and
    special tokens come from the data later), the device (a GPU that is not there) and `report_to` (a sink that
is not installed)."""
    import os

    from ..devices import local_device
    from .families import make_config
    from .reporting import check_report_to

    try:
        make_config(config.model_type, dict(config.model))
    except TypeError as err:  # a config class's own refusal of an argument
        raise ValueError(f"`model`: {err}") from err
    local_device(config.device, int(os.environ.get("LOCAL_RANK", "0")), option="`device`")
    check_report_to(config.report_to)


@reports_errors("train")
def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import train

    config = load_config(args.preset, args.config, args.overrides)
    check_train_config(config)  # before --dump-config says it is fine, and before any data is prepared
    if args.dump_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    log.debug(f"config: {json.dumps(config.to_dict())}")
    start = time.perf_counter()
    result = train(config, progress=args.verbosity >= 0)
    if not main_process():  # under torchrun: rank 0 has the last word
        return 0
    if result["history"]:
        last = result["history"][-1]
        print(
            f"done in {time.perf_counter() - start:.0f} s: step {last['step']}, train loss {last['train/loss']:.4f} "
            f"(unigram entropy of the data {result['unigram_entropy']:.4f}); checkpoint {result['checkpoint']}"
        )
    else:
        step = result["step"]
        print(f"nothing to do: {config.out_dir} is at step {step}, and max_steps is {config.max_steps}. To train "
              f"further, raise max_steps, e.g. `ramnet train ... max_steps={2 * step}` (the run continues from "
              f"step {step} on the new schedule); to start afresh, use another out_dir=DIR")
    return 0


def model_arg(command: str, model: str) -> str:
    """--model DIR, where a run directory of `ramnet train` stands for its latest checkpoint; says which
    checkpoint it took, in one line on stderr."""
    from .evaluate import model_directory

    found = model_directory(model)
    if found != Path(model):
        log.info(f"ramnet {command}: {model} is a run directory: using its latest checkpoint, {found}")
    return str(found)


def harness_args(argv: list[str]) -> list[str]:
    """lm-eval's arguments with a run directory in `--model_args pretrained=DIR` replaced by its latest
    checkpoint (`model_arg`); anything else (a checkpoint, a hub name) is left as it is."""
    out, follows = [], False
    for arg in argv:
        inline = arg.startswith("--model_args=")
        if follows or inline:
            head, text = ("--model_args=", arg[len("--model_args="):]) if inline else ("", arg)
            items = text.split(",")
            for i, item in enumerate(items):
                key, _, value = item.partition("=")
                if key.strip() == "pretrained" and Path(value).is_dir() and (Path(value) / "latest").exists() \
                        and not (Path(value) / "config.json").exists():
                    items[i] = f"{key}={model_arg('eval harness', value)}"
            arg = head + ",".join(items)
        follows = arg == "--model_args"
        out.append(arg)
    return out


@reports_errors("eval ppl")
def cmd_ppl(args: argparse.Namespace) -> int:
    from .evaluate import perplexity

    result = perplexity(
        model_arg("eval ppl", args.model), source=args.data, split=args.split, text_column=args.text_column, held_out_every=args.held_out,
        context=args.context, stride=args.stride, batch_size=args.batch_size, max_tokens=args.max_tokens, device=args.device,
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['tokens']:,} tokens (context {result['context']}, stride {result['stride']}): loss {result['loss']:.4f}, "
            f"ppl {result['ppl']:.2f}, word ppl {result['word_ppl']:.2f}, bits/byte {result['bits_per_byte']:.4f}"
        )
    return 0


@reports_errors("eval harness")
def cmd_harness(args: argparse.Namespace) -> int:
    try:
        from .lm_eval_adapter import run_cli
    except ImportError as err:
        raise ValueError(f"lm-evaluation-harness is not installed (pip install 'ramnet[eval]'): {err}") from err
    run_cli(harness_args(args.lm_eval_args))
    return 0


@reports_errors("generate")
def cmd_generate(args: argparse.Namespace) -> int:
    from ..devices import resolve_device
    from .evaluate import load
    from .generate import check_sampling, new_cache, state_bytes, stream_text

    # All the arguments are checked before the prompt is echoed (or the model loaded).
    check_sampling(args.temperature, args.top_k, args.top_p,
                   names={"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p"})
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    model, tok = load(model_arg("generate", args.model), resolve_device(args.device))
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    cache = new_cache(model)
    sizes = set()  # the state's size after every token: one value for a recurrent state, whatever the context
    start, count = time.perf_counter(), 0  # count: new tokens
    print(prompt, end="", flush=True)
    for piece in stream_text(model, tok, prompt, args.max_new_tokens, stop_at_eos=not args.ignore_eos, cache=cache,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed):
        print(piece, end="", flush=True)
        sizes.add(state_bytes(cache))
        count += 1
    elapsed = time.perf_counter() - start
    print()
    if len(sizes) > 1:  # a KV cache
        state = f"the cache grew from {min(sizes) / 2**20:.2f} to {max(sizes) / 2**20:.2f} MiB with the context"
    else:
        state = f"recurrent state {', '.join(f'{s / 2**20:.2f} MiB' for s in sizes) or 'n/a'} at every step, whatever the context"
    print(f"[{count} tokens in {elapsed:.1f} s ({count / max(elapsed, 1e-9):.1f} tokens/s); {state}]", file=sys.stderr)
    return 0


def _override_hint(option: str, value: str | None, close: str | None) -> str | None:
    """What `ramnet train --max-steps 10` gets told: config keys are not options but key=value overrides."""
    import dataclasses

    from .config import TrainConfig

    key = option.lstrip("-").replace("-", "_")
    if key.split(".")[0] in {f.name for f in dataclasses.fields(TrainConfig)}:
        return f"config keys are set as key=value, e.g. {key}={value if value is not None else 'VALUE'}"
    if close:
        return None  # a misspelt option: "did you mean ...?"
    return ("it is neither an option (`ramnet train -h`) nor a config key (`--dump-config` prints them); "
            "config keys are set as key=value, e.g. max_steps=10")


def add_lm_commands(sub) -> None:
    """Adds the language-modelling subcommands to the `ramnet` parser's subparsers."""
    data = sub.add_parser("data", help="prepare token shards for language-model training")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="tokenise a corpus into memory-mapped shards with EOS separators")
    prep.add_argument("--source", default="python-docs",
                      help="python-docs (built in, offline; default), python-stdlib (built in: the standard "
                           "library's source code), python-packages (built in: the installed packages' sources "
                           "and docs, the largest offline corpus), a text file or directory (.txt/.md/.rst/.jsonl), "
                           "fineweb-edu, wikitext-103, wikitext-2, or hf:NAME[:CONFIG] (streamed)")
    prep.add_argument("--out", help="output directory (default: data/SOURCE-TOKENIZER, e.g. data/python-docs-bpe4k: "
                                    "where a training preset with these settings reads it)")
    prep.add_argument("--tokenizer", default="bpe",
                      help="'bpe' (train a byte-level BPE on the corpus; default) or a Hugging Face tokenizer: "
                           "hub name, directory or tokenizer.json")
    prep.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    prep.add_argument("--split", default="train", help="dataset split of a Hugging Face source (default train)")
    prep.add_argument("--text-column", help="text field of a Hugging Face dataset or .jsonl file (default: text)")
    prep.add_argument("--val-every", type=int, default=20, help="every N-th document goes to the held-out split (default 20; 0: none)")
    prep.add_argument("--max-tokens", type=int, help="stop after this many training tokens")
    prep.add_argument("--shard-tokens", type=int, default=2**28, help="tokens per shard file (default 2**28)")
    add_verbosity(prep, "no progress bars; warnings and errors only")
    prep.set_defaults(func=cmd_prepare)

    train = sub.add_parser("train", unknown_option_hint=_override_hint, help="train a language model: RAM-Net or a baseline (torchrun for several GPUs or nodes)",
                           description="Config: dataclass defaults < --preset < --config file < key=value overrides "
                                       "(nested as model.hidden_size=256). model_type=ramnet|transformer++|fla.gated_deltanet|"
                                       "fla.gla|fla.raven|fla.mamba2|fla.hgrn2 picks the family; `model` holds its config class's arguments.")
    train.add_argument("--preset", choices=sorted(PRESETS),
                       help="tiny (CPU, minutes), small (one GPU) and its baselines small-transformer, "
                            "small-gated-deltanet, small-gla, small-raven, small-sliding, the hybrid small-hybrid, "
                            "paper-340m (8 GPUs)")
    train.add_argument("--config", help="YAML or JSON file of config keys (it may name a preset)")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides after the options, e.g. max_steps=100 lr=1e-3 model.hidden_size=256")
    train.add_argument("--dump-config", action="store_true", help="print the resolved config as JSON and exit")
    add_verbosity(train, "no progress bar and no progress lines; warnings and errors only")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    ppl = ev_sub.add_parser("ppl", help="strided perplexity on any text")
    ppl.add_argument("--model", required=True, help="checkpoint or save_pretrained directory, or a run directory (its latest checkpoint)")
    ppl.add_argument("--data", default="python-docs", help="text source, as for `data prepare --source` (default python-docs)")
    ppl.add_argument("--split", default="train", help="dataset split of a Hugging Face source (e.g. test)")
    ppl.add_argument("--text-column", help="text field of a Hugging Face dataset or .jsonl file")
    ppl.add_argument("--held-out", type=int, default=0, metavar="N",
                     help="score only the documents that `data prepare --val-every N` held out (default 0: all)")
    ppl.add_argument("--context", type=int, help="window length (default: the checkpoint's training length)")
    ppl.add_argument("--stride", type=int, help="window step (default: half the context)")
    ppl.add_argument("--batch-size", type=int, default=8)
    ppl.add_argument("--max-tokens", type=int, help="score only the first N tokens")
    ppl.add_argument("--device", default="auto")
    ppl.add_argument("--json", action="store_true", help="print the result as JSON")
    add_verbosity(ppl)
    ppl.set_defaults(func=cmd_ppl)
    # prefix_chars="+": every argument, --options included, goes to lm-eval untouched (lm-eval's own -h works).
    harness = ev_sub.add_parser("harness", help="lm-evaluation-harness with the `ramnet` model registered",
                                description="Runs lm-eval's command line, e.g. --model ramnet --model_args pretrained=DIR --tasks wikitext "
                                            "(DIR: a checkpoint, or a run directory: its latest checkpoint)",
                                prefix_chars="+", add_help=False)
    harness.add_argument("lm_eval_args", nargs="*", help="lm-eval arguments")
    harness.set_defaults(func=cmd_harness)

    gen = sub.add_parser("generate", help="stream text from a checkpoint")
    gen.add_argument("--model", required=True, help="checkpoint or save_pretrained directory, or a run directory (its latest checkpoint)")
    gen.add_argument("--prompt", default="", help="prompt text ('-' reads standard input)")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    gen.add_argument("--top-k", type=int, default=50, help="0: no top-k filter")
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    gen.add_argument("--device", default="auto")
    add_verbosity(gen)
    gen.set_defaults(func=cmd_generate)
