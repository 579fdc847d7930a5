"""End-to-end generation: tokens/s and ms per token of ``model.generate`` for RAM-Net, Gated DeltaNet
(fla) and Hugging Face's Llama (Transformer++) at equal parameters, each at its default and at its best.

Models: the presets of ``ramnet train`` (``ramnet/lm/config.py``), built the way training builds them
(``ramnet.lm.families.build``) with random, seeded weights and the presets' vocabulary (the Llama-2
tokenizer's 32,000 ids): ``small`` (RAM-Net), ``small-gated-deltanet`` (fla's GatedDeltaNet) and
``small-transformer`` (Llama, SDPA attention); about 55M parameters each (39M without the input
embedding; every row records the model's count). bf16 on CUDA, fp32 on the CPU, eval mode.

Modes (``--modes``; default ``default,best``):
  default  plain ``model.generate``, greedy, with the model's default cache: RAM-Net's ``RAMNetStaticCache``
           and its decode loop on CUDA (``RAMNetCache`` and transformers' loop on the CPU), fla's ``Cache``,
           transformers' ``DynamicCache`` for Llama.
  best     RAM-Net: ``cache_implementation="static"``, a ``RAMNetStaticCache``, with which ``generate``
           runs RAM-Net's decode loop (``ramnet/models/ramnet/decode_loop.py``), here with
           ``ramnet_decode_loop="compiled"``: the model's step through ``torch.compile``, and one whole
           decoding step (model, sampler, stop tokens) captured in a CUDA graph and replayed, the host
           looking every 16 steps; on the CPU the same compiled step, without a graph. (RAM-Net's
           ``default`` on CUDA is the same loop with the eager model step.) ``decode_loop`` in each row
           says how the steps ran: "graph", "eager", or empty for transformers' loop. Llama: the same,
           transformers' recommended recipe: ``cache_implementation="static"`` (a ``StaticCache``) with
           the forward auto-compiled by ``generate`` (its ``generation_config.compile_config``, mode
           "reduce-overhead"). Gated DeltaNet: fla 0.6.0's ``generate`` is its only path (its caches
           are not ``is_compileable``, so transformers never compiles it, and fla has no static cache),
           so its ``best`` row is not run and says so (``status: "skipped"``, ``same_as: "default"``).
           On the CPU transformers compiles nothing: ``best`` is the static cache, eager (``compiled``
           in each row says whether the step ran compiled).
  eager    RAM-Net only: its decode loop without the CUDA graph (``ramnet_decode_loop="eager"``): every
           kernel of every step launched from Python, what a user's eager ``generate`` costs (issue 17's
           "eager model.generate" target: 13.2 ms a token at B=1 on an H200 before the fused step).
  hf_loop  RAM-Net only: transformers' own loop over the default cache (``ramnet_decode_loop=False``): on
           CUDA the static cache, whose step transformers compiles itself (``compiled``: True); on the CPU
           the dynamic cache, eager. The other models' ``eager`` and ``hf_loop`` rows are skipped
           (``same_as: "default"``): their default already is transformers' eager loop.

Every run generates exactly N new tokens (greedy; the EOS id is unset, so nothing stops early; the
row checks the length). Timing, per cell (model, B, prompt length P, mode), with
``torch.cuda.synchronize()`` around every call:
  1. a warm-up ``generate`` with the same shapes (it compiles and captures on CUDA; ``warmup_s``). RAM-Net's
     decode loop keeps its captured graph on the model for later calls of the same shape (batch, sampler,
     stop tokens, output length rounded up to a power of two >= 256; not the prompt's length), so the
     warm-up is the call that captures (``capture_ms``, 0 if it found a kept graph; ``decode_loop_mib``
     the memory the kept loop holds) and the timed calls below replay (``timed_captures`` counts the
     timed calls that captured: 0). The kept loops are dropped after every cell, so each cell captures
     its own;
  2. ``t_N``: ``generate(max_new_tokens=N)``, the best of ``--repeats`` calls;
  3. ``t_1``: ``generate(max_new_tokens=1)``, the prefill and one token, the best of ``--repeats``.
  tok_s = B * N / t_N (end to end, prefill included); prefill_ms = t_1;
  ms_per_token = (t_N - t_1) / (N - 1), the time of one decoding step of the whole batch.
``tokens_sha`` hashes the generated tokens; ``same_tokens_as_default`` says whether ``best`` generated
the same tokens as ``default``, ``tokens_equal_frac`` and ``first_diff_step`` how far they agree. On
the CPU in fp32 they must be equal. In bf16 on CUDA a compiled step rounds differently (inductor fuses
the norms and the MLP), which flips near-tied argmaxes of a random model, and the sequences part there.

The cells (model, mode) run in order of importance (B=1 and B=64 at the shortest prompt, then those B
at the longer prompts, then the other B), and ``--deadline-s`` starts no cell after that many seconds,
so a cut run keeps the most important ones. The JSON (and the markdown table beside it) is rewritten
after every cell, so a run that is killed keeps what it measured. An out-of-memory or an error in a
cell is recorded in its row (``status``: "oom" / "error") and the sweep goes on. ``--resume`` keeps
the rows of an existing ``--out`` and runs only the cells it lacks, so the grid can be spread over
several calls (every row records its ``git_rev``).

What takes the time on an H200 is the warm-ups, not the timed calls: fla autotunes its Triton kernels
for every new shape (60-160 s a (B, prompt) cell, the first the longest), the static-cache modes
compile their step (about 15-35 s a cell), RAM-Net's kernels compile on their first call (about 25 s).
The full grid takes about 18 minutes; B=1 and B=64 at prompt 512, all models and modes, about 7.

    python benchmarks/bench_generate.py                                    # the full grid, CUDA
    python benchmarks/bench_generate.py --deadline-s 330                   # cut: no cell starts after 5.5 min
    python benchmarks/bench_generate.py --resume --deadline-s 330          # then the cells still missing
    python benchmarks/bench_generate.py --quick --out /tmp/generate.json   # a small grid, CUDA
    python benchmarks/bench_generate.py --device cpu --batch 1 --prompt 512 --new-tokens 32 --repeats 2 \\
        --models ramnet,llama --out benchmarks/results/generate_cpu.json    # the CPU numbers
    python benchmarks/bench_generate.py --device cpu --tiny --batch 1 --prompt 16 --new-tokens 4  # seconds

The measured commit is ``$RAMNET_GIT_REV`` when set (``ramnet.provenance``), else ``git describe``.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from ramnet.files import write_text_atomic
from ramnet.lm import families
from ramnet.lm.config import load_config
from ramnet.models.ramnet import modeling_ramnet
from ramnet.ops.triton_support import triton_runs_on
from ramnet.provenance import environment

# name -> the `ramnet train` preset whose model it is
MODELS = {"ramnet": "small", "gated_deltanet": "small-gated-deltanet", "llama": "small-transformer"}
LABELS = {"ramnet": "RAM-Net", "gated_deltanet": "Gated DeltaNet (fla)", "llama": "Llama (HF, SDPA)"}
VOCAB = 32_000  # the presets' tokenizer, hf-internal-testing/llama-tokenizer (Llama-2's)
# `--tiny`: the same families a few layers of width 64 deep, for tests (seconds on a CPU).
TINY_VOCAB = 512
TINY = {
    "ramnet": dict(hidden_size=64, num_hidden_layers=2, num_heads=2, head_v_dim=16, num_partitions=2,
                   partition_dim=4, topk=2, intermediate_size=128, num_cape_heads=[2, 1]),
    "gated_deltanet": dict(hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=32, intermediate_size=128),
    "llama": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
}
MODES = ("default", "best", "eager", "hf_loop")
DEFAULT_MODES = ("default", "best")  # --modes' default; eager and hf_loop when asked for
# The modes that only RAM-Net has (the others' `default` is already eager in transformers' loop).
RAMNET_ONLY_MODES = ("eager", "hf_loop")
GDN_NOTE = ("fla 0.6.0's generate is Gated DeltaNet's only path: its caches are not is_compileable (transformers "
            "does not compile them) and it has no static cache, so best = default")
GRIDS = {  # batch sizes, prompt lengths, new tokens
    "full": ([1, 16, 64, 256], [512, 8192], 256),
    "quick": ([1, 16], [128], 32),
}


class Skip(Exception):
    """A cell that is not run (recorded with its reason)."""


def cell_order(batches: list[int], prompts: list[int]) -> list[tuple[int, int]]:
    """(B, P) in order of importance: B in {1, 64} at the shortest prompt, then at the longer ones,
    then the other batch sizes at every prompt length."""
    prompts = sorted(prompts)
    core = [b for b in batches if b in (1, 64)] or batches[:1]
    rest = [b for b in batches if b not in core]
    return ([(b, prompts[0]) for b in core] + [(b, p) for p in prompts[1:] for b in core]
            + [(b, p) for b in rest for p in prompts])


def build_model(name: str, device: str, dtype: torch.dtype, tiny: bool, seed: int, max_length: int = 0):
    """The preset's model with random weights (seeded), on ``device`` in ``dtype``, in eval mode.
    ``max_length`` (prompt + new tokens) raises Llama's ``max_position_embeddings`` (2048 by default), which
    only sets when transformers warns (RoPE is computed, not tabled: no parameter depends on it)."""
    config = load_config(MODELS[name])
    kwargs = dict(config.model, vocab_size=TINY_VOCAB if tiny else VOCAB, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    if tiny:
        kwargs.update(TINY[name])
    if config.model_type == "transformer++":
        kwargs["max_position_embeddings"] = max(kwargs.get("max_position_embeddings", 2048), max_length)
    try:
        families.config_class(config.model_type)
    except ValueError as err:  # fla not installed
        raise Skip(str(err).split(" [")[0]) from err
    torch.manual_seed(seed)
    model = families.build(config.model_type, kwargs).to(device=device, dtype=dtype).eval()
    # No stop token: every call generates exactly max_new_tokens.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def param_counts(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    return dict(params=total, params_without_input_embedding=total - model.get_input_embeddings().weight.numel())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def generate_kwargs(name: str, mode: str) -> dict:
    kwargs = dict(do_sample=False, temperature=None, top_k=None, top_p=None, eos_token_id=None, pad_token_id=0)
    if mode == "best" and name in ("ramnet", "llama"):
        kwargs["cache_implementation"] = "static"
    if mode == "best" and name == "ramnet":  # asked for, whatever the defaults say
        kwargs["ramnet_decode_loop"] = "compiled"
    if mode == "eager":  # RAM-Net's decode loop without the graph: every step's kernels launched by Python
        kwargs.update(ramnet_decode_loop="eager", cache_implementation="static")  # the loop's cache, on the CPU too
    if mode == "hf_loop":  # transformers' loop over the default cache, the model step eager
        kwargs["ramnet_decode_loop"] = False
    return kwargs


def timed_generate(model, ids, mask, new_tokens: int, kwargs: dict, device: str, return_dict: bool = False):
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             return_dict_in_generate=return_dict, **kwargs)
    sync(device)
    return time.perf_counter() - start, out


def step_compiled(model, cache, device: str) -> bool:
    """Whether ``generate`` ran the decoding steps through its compiled forward (its own criteria)."""
    if device != "cuda" or cache is None or not hasattr(model, "_compiled_call"):
        return False
    try:
        caches = {"cache": cache, "past_key_values": cache}
        return bool(model._valid_auto_compile_criteria(caches, model.generation_config))
    except Exception:  # noqa: BLE001 - a transformers release without this helper: say it is not known
        return None


def forget_caches(model) -> None:
    """Drops what a model keeps between generate calls: transformers' reused static cache, RAM-Net's kept
    decode loops (graphs), so that the next cell's warm-up captures its own."""
    for attr in ("_cache",):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model, "clear_decode_graphs"):
        model.clear_decode_graphs()


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def tokens_hash(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.cpu().to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def run_cell(model, name: str, batch: int, prompt: int, mode: str, new_tokens: int, repeats: int, device: str,
             vocab: int, seed: int) -> dict:
    """One (model, B, prompt, mode) measurement; the row's fields besides model/B/prompt/mode."""
    gen = torch.Generator().manual_seed(seed + batch * 100_003 + prompt)
    ids = torch.randint(3, vocab, (batch, prompt), generator=gen).to(device)
    mask = torch.ones_like(ids)
    kwargs = generate_kwargs(name, mode)
    row = {}
    # The warm-up returns the cache, to record its kind; the timed calls return the tokens only.
    model._ramnet_decode_loop_last = None  # set by RAM-Net's decode loop when a call runs it
    warmup_s, out = timed_generate(model, ids, mask, new_tokens, kwargs, device, return_dict=True)
    row["warmup_s"] = warmup_s
    cache = getattr(out, modeling_ramnet.CACHE_FIELD, None) or getattr(out, "past_key_values", None)
    row["cache"] = type(cache).__name__ if cache is not None else None
    loop = model._ramnet_decode_loop_last
    row["decode_loop"] = None if loop is None else "graph" if loop["graph"] else "eager"
    # RAM-Net's decode loop compiles its own step where asked ("compiled"), not through transformers
    row["compiled"] = loop["compiled"] if loop is not None else step_compiled(model, cache, device)
    del out, cache
    if loop is not None:
        # The warm-up is the first call of this key (forget_caches dropped the kept loops after the last
        # cell): it captured the graph, which the model keeps; the timed calls replay it.
        row["capture_ms"] = loop["capture_s"] * 1e3 if loop["captured"] else 0.0
        row["decode_loop_mib"] = loop["held_bytes"] / 2**20
    timed_captures = 0
    t_n, sequences = float("inf"), None
    for _ in range(repeats):
        t, out = timed_generate(model, ids, mask, new_tokens, kwargs, device)
        timed_captures += bool(loop is not None and model._ramnet_decode_loop_last["captured"])
        if t < t_n:
            t_n, sequences = t, out
        del out
    t_1 = float("inf")
    for _ in range(repeats):
        t, out = timed_generate(model, ids, mask, 1, kwargs, device)
        timed_captures += bool(loop is not None and model._ramnet_decode_loop_last["captured"])
        t_1 = min(t_1, t)
        del out
    if loop is not None:  # 0: every timed call replayed the graph the warm-up captured
        row["timed_captures"] = timed_captures
    new = sequences[:, prompt:]
    if tuple(new.shape) != (batch, new_tokens):
        raise RuntimeError(f"generated {tuple(new.shape)} tokens, expected {(batch, new_tokens)}")
    row.update(
        status="ok", new_tokens=new_tokens, tok_s=batch * new_tokens / t_n,
        ms_per_token=(t_n - t_1) / (new_tokens - 1) * 1e3 if new_tokens > 1 else None,
        prefill_ms=t_1 * 1e3, t_total_s=t_n, tokens_sha=tokens_hash(new),
    )
    if t_n <= t_1:
        row["note"] = "t_N <= t_1: the timings are noise (a busy machine?); ms_per_token is meaningless"
    row["_tokens"] = new.cpu()  # compared with the default's, then dropped (not written)
    if device == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def agreement(tokens: torch.Tensor, default: torch.Tensor) -> dict:
    """How far ``tokens`` follow the default mode's: the fraction of equal tokens, and the first step (0-based)
    at which some sequence differs (None: identical). bf16 steps that round differently (a compiled step
    fuses other ops) flip near-tied argmaxes of a random model, and the sequences diverge from there."""
    equal = tokens == default
    differs = (~equal).any(dim=0).nonzero()
    return dict(tokens_equal_frac=equal.float().mean().item(),
                first_diff_step=int(differs[0]) if len(differs) else None)


def fmt(value, digits=4) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"End-to-end `model.generate`, {meta['new_tokens']} new tokens, greedy. {meta['device']}; "
        f"{meta['dtype']}; torch {meta['torch']}, transformers {meta['transformers']}, triton {meta['triton']}, "
        f"fla {meta['fla']}; commit {meta['git_rev']}.",
        "",
        "tok/s = B x N / wall time of the call (prefill included); ms/token = (t_N - t_1) / (N - 1), one "
        "decoding step of the batch; prefill = t_1 (the prompt and one token).",
        "",
    ]
    if meta["device"].startswith("cpu") and meta.get("loadavg_at_start"):
        end = meta.get("loadavg_at_end") or ["?"]
        lines += [f"The machine's load average (1 min) at the start: {meta['loadavg_at_start'][0]:.1f}, at the end: "
                  f"{end[0] if isinstance(end[0], str) else f'{end[0]:.1f}'} ({meta.get('cpu_threads')} torch threads).",
                  ""]
    for name, info in meta["models"].items():
        count = f"{info['params']:,} parameters ({info['params_without_input_embedding']:,} without the input " \
                f"embedding)" if "params" in info else info.get("skipped", "")
        lines.append(f"- {LABELS.get(name, name)} (`{info['preset']}`): {count}")
    lines += ["", "| model | mode | B | prompt | tok/s | ms/token | prefill ms | same tokens as default | cache | "
              "compiled | decode loop | status |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = r.get("same_tokens_as_default")
        if same is False and r.get("tokens_equal_frac") is not None:
            same = f"no: {r['tokens_equal_frac']:.2f} equal, apart from step {r['first_diff_step']}"
        elif same is True:
            same = "yes"
        status = r.get("status", "")
        if status not in ("ok", ""):
            status = f"{status}: {str(r.get('error') or r.get('note') or '')[:80]}"
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['B']} | {r['prompt']} | {fmt(r.get('tok_s'))} | "
            f"{fmt(r.get('ms_per_token'))} | {fmt(r.get('prefill_ms'))} | {'' if same is None else same} | "
            f"{r.get('cache') or ''} | {r.get('compiled', '')} | {r.get('decode_loop') or ''} | {status} |")
    revs = sorted({r["git_rev"] for r in rows if r.get("git_rev")})
    if len(revs) > 1:
        lines += ["", "Rows measured at several commits (each row's `git_rev` in the JSON): " + ", ".join(revs)]
    if meta.get("stopped_at_deadline"):
        groups: dict[tuple, list[str]] = {}
        for c in meta["not_run"]:
            groups.setdefault((c["B"], c["prompt"]), []).append(f"{c['model']} {c['mode']}")
        lines += ["", f"Stopped at the deadline ({meta['deadline_s']} s); not run: " + "; ".join(
            f"B={b} P={p}" + ("" if len(cells) == len(meta["models"]) * len(meta["modes"]) else f" ({', '.join(cells)})")
            for (b, p), cells in groups.items())]
    return "\n".join(lines) + "\n"


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    """The JSON and the markdown beside it, each written to a temporary file and renamed over the old one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    write_text_atomic(out.with_suffix(".md"), markdown(meta, rows))


def parse_list(text: str, cast=int) -> list:
    return [cast(item) for item in text.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/generate.json, generate_cpu.json on the CPU)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--batch", help="comma-separated batch sizes (default 1,16,64,256)")
    parser.add_argument("--prompt", help="comma-separated prompt lengths (default 512,8192)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per call (default 256)")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per measurement (the best is kept)")
    parser.add_argument("--deadline-s", type=float, default=None, help="start no cell after this many seconds")
    parser.add_argument("--quick", action="store_true", help="a small grid: B 1,16, prompt 128, 32 new tokens")
    parser.add_argument("--tiny", action="store_true", help="tiny models (2 layers of width 64), for tests")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                        help="auto: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of an existing --out (same device, dtype, tokens) and run only the cells "
                             "it lacks (its errors again); every row records its own git_rev")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU (use --device cpu)")
    batches, prompts, new_tokens = GRIDS["quick" if args.quick else "full"]
    batches = parse_list(args.batch) if args.batch else batches
    prompts = parse_list(args.prompt) if args.prompt else prompts
    new_tokens = args.new_tokens or new_tokens
    models = parse_list(args.models, str)
    modes = parse_list(args.modes, str)
    for name in models:
        if name not in MODELS:
            parser.error(f"--models: unknown {name!r} (known: {', '.join(MODELS)})")
    for mode in modes:
        if mode not in MODES:
            parser.error(f"--modes: unknown {mode!r} (known: {', '.join(MODES)})")
    if new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (ms_per_token needs a decoding step past the first token)")
    out = args.out or Path(__file__).parent / "results" / ("generate.json" if args.device == "cuda"
                                                           else "generate_cpu.json")
    dtype = {"auto": torch.bfloat16 if args.device == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32}[args.dtype]
    if args.device == "cuda":
        # One compiled step per (B, cache length) shape: more than dynamo's default 8 recompiles per model.
        for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 256))
    order = cell_order(batches, prompts)
    meta = {
        **environment(args.device), "dtype": str(dtype).removeprefix("torch."), "new_tokens": new_tokens,
        "batches": batches, "prompts": prompts, "modes": modes, "repeats": args.repeats, "seed": args.seed,
        "tiny": args.tiny, "cell_order": order, "deadline_s": args.deadline_s, "models": {},
        "triton_kernels": triton_runs_on(args.device),
        "ramnet_static_cache_by_default_on_cuda": modeling_ramnet.STATIC_CACHE_BY_DEFAULT_ON_CUDA,
        "timing": "tok_s = B*N/t_N; ms_per_token = (t_N - t_1)/(N - 1); prefill_ms = t_1; t_N, t_1 the best of "
                  "`repeats` generate calls after one warm-up call with the same shapes, synchronized",
        "gated_deltanet_best": GDN_NOTE, "loadavg_at_start": list(os.getloadavg()), "cpu_threads": torch.get_num_threads(), "argv": sys.argv[1:] if argv is None else list(argv),
    }
    rows: list[dict] = []
    if args.resume and out.exists():
        earlier = json.loads(out.read_text())
        for key in ("device", "dtype", "new_tokens", "tiny", "seed"):
            if earlier["meta"].get(key) != meta[key]:
                parser.error(f"--resume: {out} has {key}={earlier['meta'].get(key)!r}, this run {meta[key]!r}")
        rows = [r for r in earlier["rows"] if r.get("status") in ("ok", "skipped", "oom")]
        keep = ("git_rev", "torch", "transformers", "triton", "fla", "argv", "elapsed_s", "stopped_at_deadline")
        meta["earlier_runs"] = earlier["meta"].get("earlier_runs", []) + [
            {k: earlier["meta"].get(k) for k in keep}]
    done = {(r["model"], r["B"], r["prompt"], r["mode"]) for r in rows}
    built: dict[str, object] = {}
    skipped: dict[str, str] = {}
    for name in models:  # built once, reused by every cell
        meta["models"][name] = {"preset": MODELS[name]}
        try:
            built[name] = build_model(name, args.device, dtype, args.tiny, args.seed, max(prompts) + new_tokens)
            meta["models"][name].update(param_counts(built[name]), model_class=type(built[name]).__name__)
            print(f"{name}: {MODELS[name]}, {meta['models'][name]['params']:,} parameters", file=sys.stderr)
        except Skip as why:
            skipped[name] = str(why)
            meta["models"][name]["skipped"] = str(why)
            print(f"{name}: skipped ({why})", file=sys.stderr)
    vocab = TINY_VOCAB if args.tiny else VOCAB
    write(out, meta, rows)
    cells = [(batch, prompt, name, mode) for batch, prompt in order for name in models for mode in modes]
    default_tokens: dict[tuple, torch.Tensor] = {}  # (model, B, prompt) -> the default mode's new tokens
    for index, (batch, prompt, name, mode) in enumerate(cells):
        if (name, batch, prompt, mode) in done:
            continue
        if args.deadline_s is not None and time.perf_counter() - start > args.deadline_s:
            meta.update(stopped_at_deadline=True, not_run=[
                dict(model=m, B=b, prompt=p, mode=o) for b, p, m, o in cells[index:] if (m, b, p, o) not in done])
            print(f"deadline of {args.deadline_s} s reached: {len(meta['not_run'])} cells not run", file=sys.stderr)
            break
        row = {"model": name, "B": batch, "prompt": prompt, "mode": mode, "tok_s": None, "ms_per_token": None,
               "git_rev": meta["git_rev"]}
        cell_start = time.perf_counter()
        if name in skipped:
            row.update(status="skipped", error=skipped[name])
        elif name == "gated_deltanet" and mode == "best":
            row.update(status="skipped", same_as="default", note=GDN_NOTE)
        elif name != "ramnet" and mode in RAMNET_ONLY_MODES:
            row.update(status="skipped", same_as="default",
                       note=f"{mode} is RAM-Net's: this model's default is already transformers' eager loop")
        else:
            model = built[name]
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                row.update(run_cell(model, name, batch, prompt, mode, new_tokens, args.repeats, args.device,
                                    vocab, args.seed))
            except torch.OutOfMemoryError as err:
                row.update(status="oom", error=f"OutOfMemoryError: {str(err)[:300]}")
            except Exception as err:  # noqa: BLE001 - every failure is a result to record
                row.update(status="error", error=f"{type(err).__name__}: {err}"[:500],
                           traceback=traceback.format_exc(limit=6)[-2000:])
            finally:
                forget_caches(model)
                free(args.device)
            if row.get("status") == "ok":
                tokens = row.pop("_tokens")
                if mode == "default":
                    default_tokens[name, batch, prompt] = tokens
                else:
                    # (a default row of an earlier run has its hash only)
                    default_sha = next((r["tokens_sha"] for r in rows if r.get("status") == "ok" and
                                        (r["model"], r["B"], r["prompt"], r["mode"]) ==
                                        (name, batch, prompt, "default")), None)
                    if default_sha is not None:
                        row["same_tokens_as_default"] = row["tokens_sha"] == default_sha
                    if (name, batch, prompt) in default_tokens:
                        row.update(agreement(tokens, default_tokens[name, batch, prompt]))
        row["cell_s"] = time.perf_counter() - cell_start
        rows.append(row)
        write(out, meta, rows)
        if row.get("status") == "ok":
            what = (f"{row['tok_s']:10.1f} tok/s {fmt(row['ms_per_token']):>8} ms/token "
                    f"prefill {fmt(row['prefill_ms'])} ms (warm-up {row['warmup_s']:.1f} s)")
            if "same_tokens_as_default" in row:
                what += f" same tokens: {row['same_tokens_as_default']}"
        else:
            what = f"{row['status']}: {str(row.get('error') or row.get('note'))[:120]}"
        print(f"[{time.perf_counter() - start:6.0f} s] {name:<15} {mode:<8} B={batch:<4} P={prompt:<6} {what}",
              file=sys.stderr, flush=True)
    meta["elapsed_s"] = time.perf_counter() - start
    meta["loadavg_at_end"] = list(os.getloadavg())
    write(out, meta, rows)
    print(markdown(meta, rows))
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
