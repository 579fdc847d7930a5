"""RAM-Net against softmax attention and fla's GLA, DeltaNet and Gated DeltaNet, layer by layer (bf16).

Layer level: hidden 1024, B*T = 16384 tokens (32768 at T = 32768), T in 2048, 8192, 32768 (B = 8, 2, 1); forward (with
autograd on, as in training) and forward+backward (a fixed random output gradient; the input's
gradient included). Op level: ``ramnet.ops.ram_attention`` per mode, against the HBM floor: the bytes
of q, k, v, o (forward) plus those of their gradients (backward), each moved once. Medians from
``triton.testing.do_bench``; every measurement that fails is recorded with its error. fla's layers run
last, and a contender whose first call takes over ``--first-call-timeout`` seconds is dropped.

    python3 benchmarks/bench_layer.py                            # CUDA, writes results/layer.{json,md}
    python3 benchmarks/bench_layer.py --skip gated_deltanet --ram-modes triton   # --quick: T 2048, 32768; no (G)DN
    python3 benchmarks/bench_layer.py --device cpu --ram-modes parallel --out /tmp/layer_cpu.json
    python3 benchmarks/bench_layer.py --ram-modes triton/sorted,triton/token   # both PDMA kernel families
    python3 benchmarks/bench_layer.py --ram-modes triton --time-segments 8 16    # + the op on pieces side by side
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # ramnet from this checkout; bench_cpu beside this file

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_cpu import time_case  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from ramnet.files import write_text_atomic  # noqa: E402
from ramnet.layers import RAMAttention  # noqa: E402
from ramnet.ops import ram_attention  # noqa: E402
from ramnet.ops.ram.triton import pdma_kernels  # noqa: E402
from ramnet.provenance import environment  # noqa: E402

U, D_P, TOPK = 5, 4, 8  # RAM-Net: d_k = U * d_p = 20, M = d_p ** U = 1024 slots, top-8
SHAPES = {  # per device: hidden size, tokens per step, T values, RAM-Net/attention heads and d_v
    "cuda": dict(hidden=1024, tokens=16384, seq_lens=[2048, 8192, 32768], heads=16, d_v=64),
    "cpu": dict(hidden=64, tokens=256, seq_lens=[64, 256], heads=4, d_v=16),
}
FLA = {  # name: (fla.layers class, keyword arguments: the paper's Table 2 shapes at width 1024)
    "gla": ("GatedLinearAttention", dict(mode="chunk", num_heads=4, expand_k=0.5, expand_v=1.0)),
    "deltanet": ("DeltaNet", dict(mode="chunk", num_heads=16, expand_k=1.0, expand_v=1.0,
                                  use_short_conv=True, conv_size=4)),
    "gated_deltanet": ("GatedDeltaNet", dict(mode="chunk", num_heads=3, head_dim=256, expand_v=2,
                                             use_short_conv=True, conv_size=4)),
}
TARGETS = {2048: {"gla": 0.5, "attention": 1.0}, 32768: {"attention": 0.2}}  # RAM-Net fwd+bwd / contender
OP_TARGET = (8192, 0.5)  # op level: at T >= 8192, at least 50% of the HBM floor
DTYPE = torch.bfloat16


class SoftmaxAttention(nn.Module):
    """qkv projection, causal SDPA on the flash backend, o_proj: the Transformer++ token mixer."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        batch, seq_len, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, seq_len, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        backends = [SDPBackend.FLASH_ATTENTION] + ([SDPBackend.MATH] if x.device.type == "cpu" else [])
        with sdpa_kernel(backends):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(batch, seq_len, hidden))


def fla_layer(cls_name: str, hidden: int, kwargs: dict):
    """fla's layer with those of ``kwargs`` that its constructor names (checked at run time: the
    layers take ``**kwargs`` and would drop a misspelt one silently); returns it and the dropped names."""
    import fla.layers

    cls = getattr(fla.layers, cls_name)
    named = {n for n, p in inspect.signature(cls.__init__).parameters.items() if p.kind != p.VAR_KEYWORD}
    kwargs = dict(kwargs, hidden_size=hidden, layer_idx=0)
    dropped = sorted(set(kwargs) - named)
    return cls(**{k: v for k, v in kwargs.items() if k in named}), dropped


def ram_mode(spec: str):
    """``"triton"`` or ``"triton/token"``: the ``ram_attention`` mode and the Triton path's PDMA
    kernels (``ram.triton.pdma_kernels``: ``auto``, ``token`` or ``sorted``); the forward picks them
    and the backward follows its forward."""
    mode, _, kernels = spec.partition("/")
    if kernels not in ("", "auto", "token", "sorted") or (kernels and mode != "triton"):
        raise ValueError(f"--ram-modes: {spec!r} is not MODE or triton/{{auto,token,sorted}}")
    return mode, kernels or "auto"


def ram_name(spec: str) -> str:
    return "ram_" + spec.replace("/", "_")


def layer_case(make, shape, device: str, kernels: str = "auto"):
    """``case(B, T)``: a setup for ``Runner.bench`` of the layer ``make()`` in bf16 on x ``[B, T, hidden]``
    (RAM-Net's forward under ``pdma_kernels(kernels)``)."""
    def case(batch: int, seq_len: int):
        def setup():
            layer, note = make(), None
            if isinstance(layer, tuple):  # fla_layer
                layer, dropped = layer
                note = f"constructor lacks {dropped}" if dropped else None
            layer = layer.to(device=device, dtype=DTYPE).train()
            x = torch.randn(batch, seq_len, shape["hidden"], device=device, dtype=DTYPE, requires_grad=True)
            def out():
                with pdma_kernels(kernels):
                    o = layer(x)
                return o[0] if isinstance(o, tuple) else o
            return out, [x, *layer.parameters()], torch.randn_like(x), note
        return setup
    return case


def op_case(spec: str, shape, device: str, time_segments: int | None = None):
    """``case(B, T)``: a setup of ``ram_attention`` on q, k ``[B, T, H, 20]``, v ``[B, T, H, d_v]``
    (``spec`` as ``ram_mode`` takes it; ``time_segments`` pieces of each sequence side by side)."""
    mode, kernels = ram_mode(spec)

    def case(batch: int, seq_len: int):
        def setup():
            q, k = (torch.randn(batch, seq_len, shape["heads"], U * D_P, device=device, dtype=DTYPE,
                                requires_grad=True) for _ in "qk")
            v = torch.randn(batch, seq_len, shape["heads"], shape["d_v"], device=device, dtype=DTYPE,
                            requires_grad=True)
            def out():
                with pdma_kernels(kernels):
                    return ram_attention(q, k, v, num_partitions=U, topk=TOPK, mode=mode,
                                         time_segments=time_segments)[0]
            return out, [q, k, v], torch.randn_like(v), None
        return setup
    return case


def op_floor_bytes(shape, tokens: int, pass_: str) -> int:
    """Bytes that must cross HBM: q, k, v read and o written once; the backward reads do and writes
    dq, dk, dv (re-reading q, k, v not counted: a lower bound)."""
    once = tokens * shape["heads"] * (2 * U * D_P + 2 * shape["d_v"]) * DTYPE.itemsize
    return once if pass_ == "fwd" else 2 * once


class Runner:
    """Times every case, records ms or the error, and rewrites the JSON and markdown after each row."""

    def __init__(self, args, meta):
        self.args, self.meta, self.rows, self.dropped = args, meta, [], {}
        self.start = time.perf_counter()

    def sync(self):
        if self.args.device == "cuda":
            torch.cuda.synchronize()

    def median_ms(self, fn, leaves) -> float:
        if self.args.device == "cuda":
            import triton.testing
            return triton.testing.do_bench(fn, warmup=self.args.warmup_ms, rep=self.args.rep_ms,
                                           grad_to_none=leaves, return_mode="median")
        def reset_then_run():
            for t in leaves:
                t.grad = None
            fn()
        return statistics.median(time_case(reset_then_run, self.args.repeats, "cpu")) * 1e3

    def bench(self, kind: str, name: str, setup, batch: int, seq_len: int) -> None:
        """Times ``setup()``'s forward and forward+backward; records ms or the error in two rows."""
        rows = [dict(kind=kind, name=name, T=seq_len, B=batch, **{"pass": p}, ms=None, error=None)
                for p in ("fwd", "fwd+bwd")]
        try:
            if (kind, name) in self.dropped:
                raise RuntimeError(self.dropped[kind, name])
            if time.perf_counter() - self.start > self.args.time_budget:
                raise RuntimeError(f"skipped: the run's time budget of {self.args.time_budget:g} s was spent")
            self.time_passes(kind, name, setup, rows)
        except Exception as e:  # noqa: BLE001  (every failure is a result)
            for row in rows:
                row["error"] = row["error"] or f"{type(e).__name__}: {e}"[:600]
        self.free()  # after the except block: the traceback no longer holds the case's tensors
        for row in rows:
            if kind == "op":
                floor = op_floor_bytes(self.meta["shape"], batch * seq_len, row["pass"])
                floor_ms = floor / (self.args.hbm_tbps * 1e12) * 1e3
                row.update(floor_bytes=floor, floor_ms=floor_ms)
                if row["ms"]:
                    row.update(floor_fraction=floor_ms / row["ms"], achieved_tbps=floor / row["ms"] / 1e9)
            self.rows.append(row)
            print(f"{kind:5} {name:16} T={seq_len:<6} {row['pass']:8} "
                  + (f"{row['ms']:.3f} ms" if row["ms"] is not None else row["error"]), flush=True)
        self.save()

    def time_passes(self, kind: str, name: str, setup, rows) -> None:
        out, leaves, grad_out, note = setup()
        backward = lambda: out().backward(grad_out)  # noqa: E731
        for row, fn in zip(rows, (out, backward)):
            row["note"] = note
            if (kind, name) in self.dropped:  # the forward's first call ran over the limit
                row["error"] = self.dropped[kind, name]
                continue
            try:
                begin = time.perf_counter()  # the first call compiles and autotunes: timed, guarded
                fn()
                self.sync()
                row["first_call_s"] = round(time.perf_counter() - begin, 3)
                if row["first_call_s"] > self.args.first_call_timeout:
                    self.dropped[kind, name] = (f"skipped: a first call took {row['first_call_s']:.1f} s "
                                                f"> --first-call-timeout {self.args.first_call_timeout:g} s")
                    raise TimeoutError(self.dropped[kind, name])
                row["ms"] = self.median_ms(fn, leaves)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"[:600]
            if row["error"]:
                self.free()

    def free(self):
        gc.collect()
        if self.args.device == "cuda":
            torch.cuda.empty_cache()

    def ms(self, kind, name, seq_len, pass_):
        key = (kind, name, seq_len, pass_)
        return next((r["ms"] for r in self.rows if (r["kind"], r["name"], r["T"], r["pass"]) == key), None)

    def markdown(self) -> str:
        m, seq_lens, passes = self.meta, self.args.seq_lens, ("fwd", "fwd+bwd")
        ms = lambda x, d=3: "error" if x is None else f"{x:.{d}f}"  # noqa: E731
        yes_no = lambda x, ok: "n/a" if x is None else "yes" if ok(x) else "no"  # noqa: E731
        lines = [f"# Layer benchmark: {m['device']}", "",
                 f"torch {m['torch']}, triton {m['triton']}, fla {m['fla']}, ramnet {m['ramnet']} ({m['git_rev']}); "
                 f"{m['dtype']}, hidden {m['shape']['hidden']}, B*T = {m['shape']['tokens']}; medians in ms. "
                 "fwd: autograd on; fwd+bwd: a random output gradient, the input's gradient included.", "",
                 "| layer | " + " | ".join(f"T={t} {p}" for t in seq_lens for p in passes) + " |",
                 "|---|" + "---|" * (2 * len(seq_lens))]
        names = list(dict.fromkeys(r["name"] for r in self.rows if r["kind"] == "layer"))
        for n in names:
            cells = (ms(self.ms("layer", n, t, p)) for t in seq_lens for p in passes)
            lines.append(f"| {n} | {' | '.join(cells)} |")

        lines += ["", "fwd+bwd, RAM-Net / contender (targets: T=2048 <= 0.5 of GLA and <= 1.0 of attention; "
                  "T=32768 <= 0.2 of attention)", "",
                  "| RAM-Net | T | / gla | / attention | targets met |", "|---|---|---|---|---|"]
        for n in (n for n in names if n.startswith("ram_")):
            for t in seq_lens:
                ram, ratios = self.ms("layer", n, t, "fwd+bwd"), {}
                for other in ("gla", "attention"):
                    ref = self.ms("layer", other, t, "fwd+bwd")
                    ratios[other] = ram / ref if ram and ref else None
                met = [f"{o} {yes_no(ratios[o], lambda x: x <= limit)}" for o, limit in TARGETS.get(t, {}).items()]
                cells = ["n/a" if x is None else f"{x:.2f}" for x in ratios.values()]
                lines.append(f"| {n} | {t} | {' | '.join(cells)} | {', '.join(met) or '-'} |")

        lines += ["", f"Op level, `ram_attention` against the HBM floor at {self.args.hbm_tbps} TB/s: the bytes of "
                  f"q, k, v, o once, and for fwd+bwd those of their gradients too (target >= {OP_TARGET[1]:.0%} "
                  f"of the floor at T >= {OP_TARGET[0]})", "",
                  "| mode | T | pass | ms | floor ms | floor MB | achieved TB/s | of floor | target met |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in self.rows if r["kind"] == "op"):
            frac = r.get("floor_fraction")
            met = yes_no(frac, lambda x: x >= OP_TARGET[1]) if r["T"] >= OP_TARGET[0] else "-"
            lines.append(f"| {r['name']} | {r['T']} | {r['pass']} | {ms(r['ms'])} | {r['floor_ms']:.3g} | "
                         f"{r['floor_bytes'] / 1e6:.1f} | {ms(r.get('achieved_tbps'), 2)} | "
                         f"{'error' if frac is None else f'{frac:.1%}'} | {met} |")

        errors = [f"- {r['kind']} {r['name']} T={r['T']} {r['pass']}: {r['error']}" for r in self.rows if r["error"]]
        notes = sorted({f"- note, {r['name']}: {r['note']}" for r in self.rows if r.get("note")})
        return "\n".join(lines + ["", "Errors:" if errors else "No errors."] + errors + notes) + "\n"

    def save(self):
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.args.out, json.dumps({"meta": self.meta, "rows": self.rows}, indent=2) + "\n")
        write_text_atomic(self.args.out.with_suffix(".md"), self.markdown())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--ram-modes", default="triton,parallel", help="comma-separated ram_attention modes; triton/token or triton/sorted forces the PDMA kernels")
    parser.add_argument("--seq-lens", type=int, nargs="+", help="default: 2048 8192 32768 (cpu: 64 256)")
    parser.add_argument("--time-segments", type=int, nargs="*", default=[],
                        help="op level: also each mode with its sequences cut into this many pieces side by side")
    parser.add_argument("--quick", action="store_true", help="shortest and longest T only; no DeltaNet, no GDN")
    parser.add_argument("--skip", default="", help="contenders to leave out, comma-separated: ram_<mode>, "
                        "attention, gla, deltanet, gated_deltanet")
    parser.add_argument("--first-call-timeout", type=float, default=240.0)  # GLA autotunes for about 100 s on its first call
    parser.add_argument("--time-budget", type=float, default=540.0, help="start no case after this many seconds")
    parser.add_argument("--hbm-tbps", type=float, default=3.35, help="HBM bandwidth for the floor (H100 SXM: 3.35)")
    parser.add_argument("--warmup-ms", type=int, default=25)
    parser.add_argument("--rep-ms", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case on the CPU")
    parser.add_argument("--out", type=Path, help="JSON (default results/layer.json, cpu: results/layer_cpu.json)")
    args = parser.parse_args()
    shape = SHAPES[args.device]
    quick_lens = [shape["seq_lens"][0], shape["seq_lens"][-1]]
    args.seq_lens = args.seq_lens or (quick_lens if args.quick else shape["seq_lens"])
    args.out = args.out or HERE / "results" / ("layer.json" if args.device == "cuda" else "layer_cpu.json")
    skip = {s for s in args.skip.split(",") if s} | ({"deltanet", "gated_deltanet"} if args.quick else set())
    modes = [m for m in args.ram_modes.split(",") if m]
    for m in modes:
        ram_mode(m)  # a bad spec fails here, not after the first cases
    meta = dict(environment(args.device), dtype="bf16", hbm_tbps=args.hbm_tbps, argv=sys.argv[1:],
                shape=dict(shape, U=U, d_p=D_P, topk=TOPK, ram_heads=shape["heads"], attention_heads=shape["heads"]))
    print(json.dumps(meta), flush=True)
    runner, device, hidden = Runner(args, meta), args.device, shape["hidden"]

    def ram_layer(mode):
        return RAMAttention(hidden_size=hidden, num_heads=shape["heads"], head_v_dim=shape["d_v"],
                            num_partitions=U, partition_dim=D_P, topk=TOPK, mode=mode)

    cases = [("layer", ram_name(m), layer_case(lambda m=m: ram_layer(ram_mode(m)[0]), shape, device, ram_mode(m)[1]))
             for m in modes]
    cases.append(("layer", "attention", layer_case(lambda: SoftmaxAttention(hidden, shape["heads"]), shape, device)))
    cases += [("op", ram_name(m), op_case(m, shape, device)) for m in modes]
    cases += [("op", f"{ram_name(m)}_seg{n}", op_case(m, shape, device, n)) for n in args.time_segments for m in modes]
    if device == "cuda":  # fla last: their first calls autotune (GatedDeltaNet's once ran > 200 s)
        cases += [("layer", n, layer_case(lambda c=c, kw=kw: fla_layer(c, hidden, kw), shape, device))
                  for n, (c, kw) in FLA.items()]
    for kind, name, case in cases:
        for seq_len in args.seq_lens if name not in skip else []:
            batch = max(1, shape["tokens"] // seq_len)  # T = 32768 runs one sequence (the spec's anchor shape)
            runner.bench(kind, name, case(batch, seq_len), batch, seq_len)
    runner.save()
    print("\n" + runner.markdown() + f"\nwrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
