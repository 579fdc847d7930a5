"""The language-modelling ablation study: RAM-Net variants and the other families trained on the same
data, tokens and schedule, side by side. Each variant is one `ramnet train` run; the study writes one
JSON (device, versions, the measured commit, every run's held-out curve and tokens/s), a markdown
table and a perplexity-vs-tokens plot.

    python benchmarks/lm_study.py --data data/python-packages-bpe8k --out benchmarks/results/lm/study \\
        --variants ramnet,ramnet-cape-off,gated_deltanet --jobs 3

The data directory is prepared first if it does not exist (`--source`, default python-packages, BPE
8192). `--jobs N` trains N runs at once on the one GPU: perplexity is unaffected, but tokens/s then
measures a shared GPU, so speed comparisons need `--jobs 1` (the JSON records `jobs`). `--deadline-s`
stops runs still going at that time and keeps their curves so far (marked incomplete), so that the
study fits a time-limited machine; SIGTERM to the study does the same at once (`kill -TERM PID`
when the machine's time runs out sooner than planned), and the JSON is still written. With
`--resumable` each run saves a checkpoint at every evaluation and continues from its latest one: the
same command, run again (on the same machine, with the same `--runs`), takes every stopped run on from
its last evaluation, with the same curve as one unbroken run.

    python benchmarks/lm_study.py --combine benchmarks/results/lm/ablation/batch*.json --out STEM

draws one table and plot from the JSON of several studies (no training); `--scale` does the same and
also writes the comparison's `OUT.json` (`scale_rows`: family, tokens, perplexity, tokens/s).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from summarize_lm import last_run, plot, summarize, table  # noqa: E402

from ramnet.files import write_text_atomic  # noqa: E402

# The schedule every variant shares: 2000 steps of 8 x 2048 tokens (32.8M), AdamW 1e-3 -> 1e-4 cosine,
# warm-up 50, held-out perplexity every 250 steps on 16 batches.
SCHEDULE = ["seq_len=2048", "batch_size=8", "micro_batch_size=8", "max_steps=2000", "lr=1e-3", "min_lr=1e-4",
            "warmup_steps=50", "eval_interval=250", "eval_batches=16", "save_interval=0", "report_to=[]",
            "log_interval=50"]

# name: (preset, overrides). The `small` presets keep the parameter count within 0.2% of each other.
# Each RAM-Net variant is written out so that it trains exactly the model its results came from:
# `small-paper` is the paper's mixer with CAPE on the paper's absolute layers ([8, 8, 8, 8, 4, 4, 4, 4]),
# which was `small` in the study's batches 1-4; batch 5 ran on CAPE in proportion to depth.
CAPE_DEPTH = "model.num_cape_heads=[8,4,0,0,0,0,0,0]"  # the library's default schedule for 8 layers
GATE = ["model.output_gate=true", "model.intermediate_size=1237"]  # g_proj (512 x 512 a layer) paid by the MLP
# `small` as it was from batch 5 to batch 6 (the gate, the temperatures' lr x 30, CAPE on the paper's absolute
# layers), before it gained the short convolution: the model of scale_c, scale_e and batch 6's variants.
SMALL_BEFORE_CONV = [*GATE, "temperature_lr_scale=30"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    # `small`: the gated output norm, the temperatures' lr x 30, CAPE on the absolute layers and the short
    # convolution (the comparison's RAM-Net, the same model as ramnet-conv-gate).
    "ramnet": ("small", []),
    "ramnet-paper": ("small-paper", []),
    "ramnet-cape-depth": ("small-paper", [CAPE_DEPTH]),  # `ramnet` of batch 5
    "ramnet-cape-off": ("small-paper", ["model.num_cape_heads=[0,0,0,0,0,0,0,0]"]),
    "ramnet-u5": ("small-paper", ["model.num_partitions=5"]),  # M 1024, d_k 20 (the paper's U 5 x d_p 4)
    "ramnet-u4dp6": ("small-paper", ["model.partition_dim=6"]),  # M 1296, d_k 24
    "ramnet-k16": ("small-paper", ["model.topk=16"]),
    "ramnet-k4": ("small-paper", ["model.topk=4"]),
    "ramnet-gamma0": ("small-paper", ["model.gamma=0.0"]),
    "ramnet-h16": ("small-paper", ["model.num_heads=16", "model.head_v_dim=32"]),
    # Sharper addresses (batch 5, CAPE by depth): the product softmax at temperature 0.5 (logits x 2 from
    # the start), or the per-head e^alpha learning 30x faster than the rest.
    "ramnet-tau05": ("small-paper", [CAPE_DEPTH, "model.tau=0.5"]),
    "ramnet-alpha-lr30": ("small-paper", [CAPE_DEPTH, "temperature_lr_scale=30"]),
    # Gated DeltaNet's ingredients added to RAM-Net: its short convolution (4) on q, k, v, and its gated
    # output norm (batch 5, CAPE by depth).
    "ramnet-conv": ("small-paper", ["model.short_conv_size=4"]),
    "ramnet-gate": ("small-paper", [CAPE_DEPTH, *GATE]),
    "ramnet-conv-cape-off": ("small-paper", ["model.short_conv_size=4", "model.num_cape_heads=[0,0,0,0,0,0,0,0]"]),
    # Batch 6, on `small` before the convolution (the comparison's RAM-Net then) at the comparison's 50M
    # tokens. Forgetting: a written slot keeps (1 - w)^gamma of its content, and blurred addresses write
    # small w, so at gamma 1 a slot averages over many writes; gamma 4 forgets 4x faster, the spread gives
    # each layer heads of four time scales (CAPE heads first in layers 5-8, so both halves get all four).
    # And the short convolution on top of the gate, which `small` then took.
    "ramnet-gamma4": ("small-paper", [*SMALL_BEFORE_CONV, "model.gamma=4.0"]),
    "ramnet-gamma16": ("small-paper", [*SMALL_BEFORE_CONV, "model.gamma=16.0"]),
    "ramnet-gamma-spread": ("small-paper", [*SMALL_BEFORE_CONV, "model.gamma=[1,4,16,64,1,4,16,64]"]),
    "ramnet-conv-gate": ("small-paper", [*SMALL_BEFORE_CONV, "model.short_conv_size=4"]),
    # The memory alone, everything else equal: the hybrid layer with its KV memory off (window 0) is one
    # fast-weight memory behind the shared q, k, v, a per-channel sigmoid gate, the per-head RMSNorm and
    # o_proj. With RAM-Net's memory (no CAPE: the hybrid's default) against DeltaNet's delta rule on the same
    # 16-wide keys (a state of 8 x 16 x 64 floats a layer against RAM-Net's 8 x 256 x 65): whether RAM-Net's
    # write and read, rather than the rest of the model, hold it behind Gated DeltaNet.
    "fw-ramnet": ("small-hybrid", ["model.window_size=0"]),
    "fw-deltanet": ("small-hybrid", ["model.window_size=0", "model.hybrid_fw=deltanet", "model.num_partitions=1",
                                     "model.partition_dim=16"]),
    # What the 33M-token ablation favoured, together: the comparison's RAM-Net of scale_c and scale_e.
    "ramnet-cape-absolute-gate-alpha-lr30": ("small-paper", SMALL_BEFORE_CONV),
    "ramnet-cape-absolute": ("small-paper", []),  # the name of `ramnet-paper` in batches 1-4
    "gated_deltanet": ("small-gated-deltanet", []),
    "gated_deltanet-noconv": ("small-gated-deltanet", ["model.use_short_conv=false"]),
    "transformer++": ("small-transformer", []),
    "sliding": ("small-sliding", []),
    "hybrid": ("small-hybrid", []),
    "gla": ("small-gla", []),  # the model of the earlier ad-hoc variant (7 layers, 4 heads), now a preset
    "raven": ("small-raven", []),
}


# The comparison's runs (`scale.json`) and their family, by variant: each family's preset as it is (one
# command per family: `--variants FAMILY --set max_steps=3052`), and RAM-Net's `small` as it was before the
# short convolution. A study's other variants (ablations) are left out of the comparison.
COMPARED = {"ramnet": "ramnet", "ramnet-cape-absolute-gate-alpha-lr30": "ramnet", "gated_deltanet": "gated_deltanet",
            "gla": "gla", "raven": "raven", "transformer++": "transformer++", "sliding": "sliding", "hybrid": "hybrid"}


def corpus_of(meta: dict) -> str:
    """The corpus a study trained on, in a few words (perplexities compare only within one corpus)."""
    data = meta["data"]
    return (f"{data['source']}: {data['splits']['train']['tokens'] / 1e6:.2f}M training tokens, "
            f"{data['distributions']} distributions")


def stand_ins_replaced(studies: list[dict]) -> set[tuple[str, str]]:
    """The (variant, corpus) runs that a family's own preset replaces: a stand-in of a family (a variant
    mapped to it in ``COMPARED`` that is not named after it, such as RAM-Net's ``small`` before the
    convolution) gives way on a corpus where the family's preset has a complete run."""
    done = {(r["variant"], corpus_of(s["meta"])) for s in studies for r in s["rows"] if r["status"] == "done"}
    return {(variant, corpus) for variant, family in COMPARED.items() if variant != family
            for name, corpus in done if name == family}


def scale_rows(studies: list[dict]) -> list[dict]:
    """`scale.json`'s rows from studies' JSON: one per compared run (``COMPARED``) and held-out evaluation,
    ``{family, tokens, ppl, tok_s}`` and the run it comes from (its variant, whether it reached its
    max_steps, the study's commit, device and corpus, and how many runs shared the GPU, which is what its
    tokens/s measured)."""
    rows, replaced = [], stand_ins_replaced(studies)
    for study in studies:
        meta = study["meta"]
        for run in study["rows"]:
            if "tokens" not in run or run["variant"] not in COMPARED or (run["variant"], corpus_of(meta)) in replaced:
                continue
            family = COMPARED[run["variant"]]
            for tokens, ppl in run["evals"]:
                rows.append(dict(family=family, tokens=tokens, ppl=ppl, tok_s=run["tok_s"], variant=run["variant"],
                                 complete=run["status"] == "done", final=tokens == run["evals"][-1][0],
                                 git_rev=meta["git_rev"], device=meta.get("device"), jobs=meta["jobs"],
                                 corpus=corpus_of(meta)))
    return rows


# What each study records for itself (its rows say which study they come from), not the comparison.
_STUDY_ONLY = ("argv", "jobs", "extra", "time", "data", "resumable")


def scale_meta(studies: list[dict]) -> dict:
    """The comparison's environment from its studies': a value they share once, the sorted distinct values
    where they differ (the device and the commit of studies run on several machines); each study's own
    settings and notes stay in its file."""
    keys = dict.fromkeys(k for s in studies for k in s["meta"] if k not in _STUDY_ONLY and not k.endswith("_note"))
    meta = {}
    for key in keys:
        values = sorted({json.dumps(s["meta"].get(key), sort_keys=True) for s in studies})
        meta[key] = json.loads(values[0]) if len(values) == 1 else [json.loads(v) for v in values]
    return meta


def scale_summaries(studies: list[dict]) -> dict[str, dict]:
    """The runs of several studies for one table and plot, a later study's run replacing an earlier one
    of the same variant on the same corpus, and a complete run replacing the same variant's incomplete
    ones on any corpus; where the studies span corpora, each run is named with its corpus's training
    tokens."""
    tagged = len({corpus_of(s["meta"]) for s in studies}) > 1
    complete = {r["variant"] for s in studies for r in s["rows"] if r["status"] == "done"}
    summaries, replaced = {}, stand_ins_replaced(studies)
    for study in studies:
        train = study["meta"]["data"]["splits"]["train"]["tokens"]
        done = {r["variant"] for r in study["rows"] if r["status"] == "done"}
        for variant, summary in summaries_of(study["rows"]).items():
            if (variant not in COMPARED or variant in complete and variant not in done
                    or (variant, corpus_of(study["meta"])) in replaced):
                continue
            summaries[f"{variant} [{train / 1e6:.1f}M corpus]" if tagged else variant] = summary
    return summaries


def prepare(data: Path, source: str, vocab_size: int) -> None:
    if (data / "meta.json").exists():
        return
    subprocess.run([sys.executable, "-m", "ramnet", "data", "prepare", "--source", source, "--vocab-size",
                    str(vocab_size), "--out", str(data)], check=True)


# What `--resumable` adds to the schedule: a checkpoint at every evaluation, and continuing from the latest.
RESUMABLE = ["resume=auto", "save_interval=250"]


def command(name: str, data: Path, runs: Path, extra: list[str], resumable: bool = False) -> list[str]:
    """`ramnet train` for one variant: its preset, the shared schedule, its overrides, then ``extra``."""
    preset, overrides = VARIANTS[name]
    return [sys.executable, "-m", "ramnet", "train", "--preset", preset, "--quiet", f"data={data}",
            f"out_dir={runs / name}", "resume=none", *SCHEDULE, *(RESUMABLE if resumable else []), *overrides,
            *extra]


class Deadline:
    """When the study stops its runs: ``seconds`` from now, or at once after SIGTERM (``on_sigterm``)."""

    def __init__(self, seconds: float):
        self.at = time.time() + seconds

    def passed(self) -> bool:
        return time.time() >= self.at

    def now(self, *_signal_args) -> None:
        self.at = 0.0

    def on_sigterm(self):
        """Bring the deadline forward on SIGTERM; returns the handler it replaced."""
        return signal.signal(signal.SIGTERM, self.now)


def run_all(names: list[str], data: Path, runs: Path, jobs: int, extra: list[str], deadline: Deadline,
            log, resumable: bool = False) -> dict[str, str]:
    """Train the variants, ``jobs`` at a time; returns each one's status (done, failed, stopped)."""
    pending, running, status = list(names), {}, {}
    while pending or running:
        while pending and len(running) < jobs and not deadline.passed():
            name = pending.pop(0)
            (runs / name).mkdir(parents=True, exist_ok=True)
            logf = open(runs / name / "train.log", "a" if resumable else "w")
            running[name] = (subprocess.Popen(command(name, data, runs, extra, resumable), stdout=logf,
                                              stderr=subprocess.STDOUT), logf, time.time())
            log(f"started {name}")
        time.sleep(2)
        for name, (proc, logf, start) in list(running.items()):
            if proc.poll() is None and not deadline.passed():
                continue
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
                status[name] = "stopped at the deadline"
            else:
                status[name] = "done" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            logf.close()
            log(f"{name}: {status[name]} after {time.time() - start:.0f} s")
            if status[name].startswith("failed"):
                log((runs / name / "train.log").read_text()[-3000:])
            del running[name]
        if deadline.passed():
            for name in pending:
                status[name] = "not started (deadline)"
            pending = []
    return status


def summaries_of(rows: list[dict]) -> dict[str, dict]:
    """The `summarize_lm` summaries of a study's rows (those that produced metrics)."""
    return {r["variant"]: dict(steps=r.get("steps"), tokens=r["tokens"], evals=r["evals"], final_ppl=r["ppl"],
                               best_ppl=r["best_ppl"], tokens_per_s=r["tok_s"], peak_memory_gib=r["peak_memory_gib"])
            for r in rows if "tokens" in r}


def write_report(summaries: dict[str, dict], out: Path, title: str = "held-out perplexity, same data and schedule") -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out.with_suffix(".md"), table(summaries))
    plot(summaries, out.with_suffix(".png"), title)
    print(table(summaries))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="prepared data directory (prepared if missing)")
    parser.add_argument("--combine", nargs="+", type=Path, metavar="STUDY.json",
                        help="draw the table and plot of earlier studies' JSON instead of training")
    parser.add_argument("--scale", nargs="+", type=Path, metavar="STUDY.json",
                        help="write OUT.json (the comparison's {meta, rows}), OUT.md and OUT.png from studies' JSON")
    parser.add_argument("--source", default="python-packages", help="corpus to prepare when --data is missing")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--variants", default="ramnet", help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--runs", type=Path, default=Path("runs/lm_study"), help="where the runs go")
    parser.add_argument("--out", type=Path, required=True, help="results prefix: OUT.json, OUT.md, OUT.png")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once on the GPU")
    parser.add_argument("--set", dest="extra", nargs="*", default=[], metavar="KEY=VALUE",
                        help="`ramnet train` overrides applied to every variant after its own (e.g. max_steps=500)")
    parser.add_argument("--deadline-s", type=float, default=float("inf"), help="stop runs after this many seconds")
    parser.add_argument("--resumable", action="store_true",
                        help="checkpoint at every evaluation and continue stopped runs from their latest checkpoint")
    args = parser.parse_args()
    if args.combine:
        write_report({k: v for f in args.combine for k, v in summaries_of(json.loads(f.read_text())["rows"]).items()},
                     args.out)
        return
    if args.scale:
        studies = [json.loads(f.read_text()) for f in args.scale]
        meta = scale_meta(studies)
        meta.update(studies=[str(f) for f in args.scale], corpora={corpus_of(s["meta"]): s["meta"]["data"] for s in studies})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out.with_suffix(".json"), json.dumps({"meta": meta, "rows": scale_rows(studies)}, indent=2) + "\n")
        summaries = scale_summaries(studies)
        write_report(summaries, args.out, "held-out perplexity, same schedule"
                     + (" (corpus in brackets)" if any("corpus]" in k for k in summaries) else ", same data"))
        return
    if args.data is None:
        parser.error("--data is needed to train (or --combine to draw earlier studies)")
    names = [n for n in args.variants.split(",") if n]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    deadline = Deadline(args.deadline_s)
    deadline.on_sigterm()
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731

    import torch

    from ramnet.provenance import environment

    start = time.time()
    prepare(args.data, args.source, args.vocab_size)
    log(f"data ready after {time.time() - start:.0f} s")
    status = run_all(names, args.data, args.runs, args.jobs, args.extra, deadline, log, args.resumable)

    rows = []
    for name in names:
        path = args.runs / name / "metrics.jsonl"
        if not path.exists() or not path.read_text().strip():  # never started, or stopped before its first step
            rows.append(dict(variant=name, status=status[name]))
            continue
        s = summarize(last_run(path))
        preset, overrides = VARIANTS[name]
        rows.append(dict(variant=name, preset=preset, overrides=overrides, status=status[name], steps=s["steps"],
                         tokens=s["tokens"],
                         ppl=s["final_ppl"], best_ppl=s["best_ppl"], tok_s=s["tokens_per_s"],
                         peak_memory_gib=s["peak_memory_gib"], evals=s["evals"]))
    data_meta = json.loads((args.data / "meta.json").read_text())
    data_meta["distributions"] = len(data_meta.get("distributions", []))  # the count; the list is in meta.json
    meta = dict(environment("cuda" if torch.cuda.is_available() else "cpu"), jobs=args.jobs, schedule=SCHEDULE,
                data=data_meta, extra=args.extra, resumable=args.resumable, argv=sys.argv[1:],
                time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out.with_suffix(".json"), json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    summaries = summaries_of(rows)
    if summaries:
        write_report(summaries, args.out)
    else:
        print("no run produced metrics")


if __name__ == "__main__":
    main()
