"""The layouts of the decoding step (``ram_decode_step(..., layout=...)``, ``ramnet/ops/ram/step.py``)
side by side in CUDA graphs, against fla's Gated DeltaNet step, in one process: the numbers that
choose ``step.py``'s default layout by batch size (issue 17, item 3).

Shape: the paper layer, H 16, d_v 64, U 5, d_p 4 (d_k 20, M 1024), K 8, CAPE on half the heads,
state S [B, H, M, d_v] fp32 + z [B, H, M], bf16 q, k, v; B in {1, 16, 64, 256}. Every layout is
first checked against the torch step (the torch decoder and ``pdma_step`` of
``ramnet/ops/ram/recurrent.py``) on one step from the same state: max errors of o, S and z, and
offset advanced by one; a layout that fails the check is not timed.

Timing (CUDA): the step captured in a CUDA graph, replayed; two numbers per case, both medians in ms:
``ms`` 20 back-to-back replays between two events, repeated (the GPU kept busy: small kernels
otherwise leave it at low clocks), and ``ms_do_bench`` ``triton.testing.do_bench`` on one replay
(as ``bench_decode.py``'s ``*_graph`` rows). GDN: fla's ``fused_recurrent_gated_delta_rule`` at H 16,
d_k = d_v = 128 (``bench_decode.case_gdn``), when fla imports.

    python benchmarks/bench_step_variants.py --out benchmarks/results/step_variants_h200.json
    TRITON_INTERPRET=1 python benchmarks/bench_step_variants.py --device cpu --quick --out /tmp/sv.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from ramnet.files import write_text_atomic
from ramnet.ops import RAMState
from ramnet.ops.ram import pdma_step
from ramnet.ops.ram import step as step_module
from ramnet.ops.ram.common import decode_tokens
from ramnet.ops.ram.step import decode_spec, ram_decode_step
from ramnet.provenance import environment

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import Skip, capture, case_gdn  # noqa: E402  (beside this script)

PAPER = dict(H=16, d_v=64, U=5, d_p=4, K=8)
QUICK_CPU = dict(H=2, d_v=24, U=3, d_p=4, K=5)  # the interpreter's smoke test: small and fast
ACT = torch.bfloat16
# name -> (layout, the split layout's d_v columns per program, the dense layout's warps (step.DENSE_WARPS;
# None: step.dense_warps' rule by B * H))
# ("torch", the torch decoder + the step kernel, is the check's reference, not a contender: a dozen
# launches, and until ab11412 its decoder failed a CUDA graph capture.)
VARIANTS = {
    "fused": ("fused", None, None),
    "dense": ("dense", None, None),
    "dense_w1": ("dense", None, 1),
    "dense_w2": ("dense", None, 2),
    "dense_w4": ("dense", None, 4),
    "split16": ("split", 16, None),
    "split32": ("split", 32, None),
    "separate": ("separate", None, None),
}
GDN = (16, 128, 128)  # H, d_k, d_v


def make_problem(batch, shape, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed + batch)
    heads, d_v, d_k, slots = shape["H"], shape["d_v"], shape["U"] * shape["d_p"], shape["d_p"] ** shape["U"]
    state = RAMState(torch.randn(batch, heads, slots, d_v, generator=gen),
                     torch.rand(batch, heads, slots, generator=gen) + 0.5,
                     torch.full((batch,), 1000, dtype=torch.long))
    q, k = (torch.randn(batch, heads, d_k, generator=gen).to(ACT) for _ in range(2))
    v = torch.randn(batch, heads, d_v, generator=gen).to(ACT)
    return RAMState(*(x.to(device) for x in state)), tuple(x.to(device) for x in (q, k, v))


def the_spec(shape, device):
    cape = [h % 2 == 0 for h in range(shape["H"])]
    gamma = [(0.0, 1.0, 2.0, 0.5)[h % 4] for h in range(shape["H"])]  # exact 0 and 1, and two others
    return decode_spec(shape["H"], shape["U"] * shape["d_p"], num_partitions=shape["U"], topk=shape["K"],
                       gamma=torch.tensor(gamma), cape=torch.tensor(cape), device=device)


def torch_step(q, k, v, state, spec):
    """The reference: the torch decoder and the torch ``pdma_step`` (recurrent.py's step)."""
    write_idx, write_w, decay, read_idx, read_w = decode_tokens(q[:, None].float(), k[:, None].float(), spec,
                                                                state.offset[:, None])
    _, _, o = pdma_step(state.S, state.z, write_idx[:, 0], write_w[:, 0], decay[:, 0], v.float(), read_idx[:, 0],
                        read_w[:, 0], spec.eps, inplace=True)
    state.offset.add_(1)
    return o


def variant_fn(name):
    layout, block_dv, warps = VARIANTS[name]

    def fn(q, k, v, state, spec):
        if block_dv is not None:
            step_module.SPLIT_BLOCK_DV = block_dv  # read at each call (constants cached per block)
        step_module.DENSE_WARPS = warps  # read at each call (constants cached per warps)
        return ram_decode_step(q, k, v, state, spec, layout=layout)

    return fn


def check(name, batch, shape, device) -> dict:
    state, (q, k, v) = make_problem(batch, shape, device)
    spec = the_spec(shape, device)
    ref = RAMState(*(x.clone() for x in state))
    o_ref = torch_step(q, k, v, ref, spec)
    o = variant_fn(name)(q, k, v, state, spec)
    err = dict(err_o=(o.float() - o_ref).abs().max().item(), err_S=(state.S - ref.S).abs().max().item(),
               err_z=(state.z - ref.z).abs().max().item())
    # o is bf16 (|o| about 1-3): a few bf16 ulps; S and z fp32.
    err["ok"] = bool(err["err_o"] < 5e-2 and err["err_S"] < 1e-4 and err["err_z"] < 1e-4
                     and torch.equal(state.offset, ref.offset))
    return err


def time_graph(replay, device) -> tuple[float, float | None]:
    """(median ms per replay over back-to-back bursts, do_bench median ms) on CUDA; a plain timer on CPU."""
    if device != "cuda":
        replay()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            replay()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times), None
    from triton.testing import do_bench

    burst, per = 20, []
    for _ in range(5):
        replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(30):
        start.record()
        for _ in range(burst):
            replay()
        end.record()
        end.synchronize()
        per.append(start.elapsed_time(end) / burst)
    return statistics.median(per), do_bench(replay, warmup=25, rep=100, return_mode="median")


def spin(device):
    """A few ms of matmuls, so that the GPU runs at its working clocks when a case starts."""
    if device == "cuda":
        a = torch.randn(4096, 4096, device=device, dtype=ACT)
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def time_variant(name, batch, shape, device) -> dict:
    state, (q, k, v) = make_problem(batch, shape, device)
    spec, fn = the_spec(shape, device), variant_fn(name)
    step = lambda: fn(q, k, v, state, spec)  # noqa: E731
    replay = capture(step) if device == "cuda" else step
    spin(device)
    ms, ms_do_bench = time_graph(replay, device)
    return dict(ms=ms, ms_do_bench=ms_do_bench)


def time_gdn(batch, device) -> dict:

    try:
        fn, _, impl = case_gdn(batch, 1, device, *GDN, graph=True)
    except Skip as why:
        return dict(skipped=str(why))
    spin(device)
    ms, ms_do_bench = time_graph(fn, device)
    return dict(ms=ms, ms_do_bench=ms_do_bench, impl=impl)


def sm_clocks() -> str | None:
    """nvidia-smi's current and max SM clocks (the small kernels here are latency bound: clocks matter)."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def markdown(meta, rows, batches) -> str:
    names = [n for n in [*VARIANTS, "gdn_h16_k128"] if any(r["variant"] == n for r in rows)]
    find = {(r["variant"], r["B"]): r for r in rows}

    def cell(row, key):
        if row is None:
            return ""
        if row.get("error"):
            return "error"
        if row.get("skipped"):
            return "skipped"
        if row.get("ok") is False:
            return "WRONG"
        return f"{row[key]:.4f}" if row.get(key) is not None else "n/a"

    lines = [f"Decoding step layouts, {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, "
             f"fla {meta['fla']}, git {meta.get('git_rev')}. Shape {meta['shape']}. SM clocks after the run "
             f"(current, max): {meta.get('sm_clocks_after')}.", ""]
    for key, what in (("ms", "ms per step, CUDA graph, median of 20-replay bursts"),
                      ("ms_do_bench", "ms per step, CUDA graph, do_bench median (bench_decode's *_graph)")):
        lines += [f"{what}:", "", "| B | " + " | ".join(names) + " | best RAM layout |",
                  "|---|" + "---|" * (len(names) + 1)]
        for b in batches:
            ram = [(find[(n, b)][key], n) for n in VARIANTS if (n, b) in find and find[(n, b)].get(key) is not None
                   and find[(n, b)].get("ok") and n != "torch"]
            best = min(ram)[1] if ram else ""
            lines.append(f"| {b} | " + " | ".join(cell(find.get((n, b)), key) for n in names) + f" | {best} |")
        lines.append("")
    lines += ["Check against the torch step (max |error| of o (bf16), S, z):", ""]
    for r in rows:
        if "err_o" in r:
            lines.append(f"- {r['variant']} B={r['B']}: o {r['err_o']:.2e}, S {r['err_S']:.2e}, z {r['err_z']:.2e}"
                         f"{'' if r['ok'] else '  WRONG'}")
    problems = [r for r in rows if r.get("error") or r.get("skipped")]
    lines += [""] + [f"- {r['variant']} B={r['B']}: {r.get('error') or r.get('skipped')}" for r in problems]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON path (the markdown table beside it, .md)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="B 1 and 2; on CPU a small shape")
    parser.add_argument("--batch", type=int, nargs="+")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    shape = QUICK_CPU if args.device == "cpu" and args.quick else PAPER
    batches = args.batch or ([1, 2] if args.quick else [1, 16, 64, 256])
    names = args.variants or list(VARIANTS)
    meta = {**environment(args.device), "shape": dict(shape, d_k=shape["U"] * shape["d_p"],
                                                       M=shape["d_p"] ** shape["U"]),
            "batches": batches, "variants": {n: VARIANTS[n] for n in names}, "argv": sys.argv[1:],
            "timer": "CUDA graph replay: events over 20-replay bursts (ms), triton do_bench (ms_do_bench)"
            if args.device == "cuda" else "perf_counter, median of 3 eager calls"}
    rows, started = [], time.time()
    for batch in batches:
        for name in names:
            row = dict(variant=name, B=batch)
            try:
                row.update(check(name, batch, shape, args.device))
                if row["ok"]:
                    row.update(time_variant(name, batch, shape, args.device))
            except Exception as err:  # noqa: BLE001 - a failure is a result
                row["error"] = f"{type(err).__name__}: {err}"[:500]
                row["traceback"] = traceback.format_exc(limit=6)[-3000:]
            rows.append(row)
            print(f"B={batch:<4} {name:<10} " + (f"{row['ms']:.4f} ms (do_bench {row['ms_do_bench']})"
                  if row.get("ms") is not None else row.get("error", "not timed")) +
                  (f"  err o {row['err_o']:.1e} S {row['err_S']:.1e} z {row['err_z']:.1e}" if "err_o" in row else "")
                  + f"  [{time.time() - started:.0f} s]", file=sys.stderr, flush=True)
        if args.device == "cuda":
            row = dict(variant="gdn_h16_k128", B=batch)
            try:
                row.update(time_gdn(batch, args.device))
            except Exception as err:  # noqa: BLE001
                row["error"] = f"{type(err).__name__}: {err}"[:500]
            rows.append(row)
            print(f"B={batch:<4} gdn        {row.get('ms', row.get('skipped') or row.get('error'))}",
                  file=sys.stderr, flush=True)
    meta["sm_clocks_after"] = sm_clocks() if args.device == "cuda" else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    table = markdown(meta, rows, batches)
    write_text_atomic(args.out.with_suffix(".md"), table)
    print("\n" + table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
