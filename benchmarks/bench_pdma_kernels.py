"""The Triton path's PDMA kernel families side by side, through ``ram_attention(..., mode="triton")``
with each forced (``ram.triton.pdma_kernels``): token-by-token (``ops/pdma/token_triton.py``) and
slot-sorted (``ops/pdma/triton.py``), and on request the token family on the on-chip CUDA kernels
(``ops/pdma/onchip.py``): ``onchip`` its forward and backward (the backward on chip where its tables
fit in shared memory, else the Triton one: the row's ``backward`` says which), ``onchip_tb`` its
forward with the Triton token backward, so that one run compares the two backwards; at the paper's
layer shape (H 16, d_v 64, U 5 x d_p 4 so M 1024, K 8, bf16) and B x T in {8 x 2048, 2 x 8192,
1 x 32768}; ``--partitions`` adds larger memories (U 6, 7, 8: M 4096 to 65536).

Per shape: first the token kernels' outputs and input gradients against the slot-sorted kernels' (the
largest difference over the largest value), then ``triton.testing.do_bench`` medians of the forward
(no grad) and of forward+backward, the peak memory of forward+backward over the inputs, and the token
kernels alone (fwd+bwd on tokens decoded beforehand; the on-chip ones too, and they sit out the shapes
whose forward's table slice does not fit in shared memory, ``onchip_fits``). With ``--time-segments n``
the token kernels also run each shape cut into n pieces (``ram_attention(time_segments=n)``). Then, at
the first shape, the table families' launch settings (module constants; each setting compiles the
kernels again, tens of seconds for the Triton ones).

    python benchmarks/bench_pdma_kernels.py [--out benchmarks/results/pdma_kernels_h200.json]
    python benchmarks/bench_pdma_kernels.py --families sorted,token --shapes 8x2048 --no-sweep   # the quickest
    python benchmarks/bench_pdma_kernels.py --families sorted,token,onchip,onchip_tb --shapes 8x2048 1x32768

(Until 2026-12-07 this was ``bench_chunk_pdma.py``, which timed the chunked kernels, since removed,
against the sorted ones: ``results/chunk_pdma_h100.json``.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
import triton.testing

from ramnet.files import write_text_atomic
from ramnet.ops import ram_attention
from ramnet.ops.pdma import onchip, token_triton
from ramnet.ops.ram.common import decode_tokens
from ramnet.ops.ram.spec import build_spec
from ramnet.ops.ram.triton import pdma_kernels
from ramnet.provenance import environment

HEADS, D_V, U, D_P, TOPK = 16, 64, 5, 4, 8
CAPE = torch.tensor([h % 2 == 0 for h in range(HEADS)])
SHAPES = ["8x2048", "2x8192", "1x32768"]
FAMILIES = ["sorted", "token"]  # the default; "onchip" and "onchip_tb" on request
KNOWN_FAMILIES = ["sorted", "token", "onchip", "onchip_tb"]
LAUNCHERS = {"token": (token_triton, "token_pdma_triton"), "onchip": (onchip, "onchip_pdma"),
             "onchip_tb": (onchip, "onchip_pdma")}
# The on-chip families run pdma_kernels("onchip") with this onchip.BACKWARD: "auto" takes the on-chip backward
# where its tables fit in shared memory; "onchip_tb" the Triton token backward.
ONCHIP_BACKWARD = {"onchip": "auto", "onchip_tb": "triton"}
# Launch settings tried at the first shape, per family: module constants of its launcher, each one
# change from the defaults: d_v columns a program (WIDTH), warps, the L2 hints.
SWEEP = {
    "token": [(f"width {w}, {n} warp{'s' if n > 1 else ''}", dict(WIDTH=w, NUM_WARPS=n))
              for w, n in ((16, 1), (64, 1), (32, 2), (64, 2))] + [("no cache hints", dict(KEEP="", STREAM=""))],
    # the on-chip forward's columns a block and how many tokens' inputs it loads ahead, and the backward's (its
    # width 32 does not fit at M 1024, its prefetch 3 spills)
    "onchip": [("width 16", dict(WIDTH=16)), ("prefetch 1", dict(PREFETCH=1)), ("prefetch 3", dict(PREFETCH=3)),
               ("backward width 8", dict(BACKWARD_WIDTH=8)), ("backward prefetch 1", dict(BACKWARD_PREFETCH=1))],
}
MISMATCH = 2e-2  # bf16 outputs and gradients: a few bf16 ulps of the largest value
DEVICE = "cuda"


def inputs(batch: int, seq_len: int, partitions: int):
    gen = torch.Generator(DEVICE).manual_seed(0)
    shape = (batch, seq_len, HEADS)
    q, k = (torch.randn(*shape, partitions * D_P, device=DEVICE, generator=gen, dtype=torch.bfloat16) for _ in "qk")
    v = torch.randn(*shape, D_V, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    return q, k, v, torch.randn_like(v)


@contextlib.contextmanager
def family_kernels(family: str):
    """Inside, the Triton path runs ``family``'s PDMA kernels (the on-chip ones with their backward)."""
    backward = onchip.BACKWARD
    onchip.BACKWARD = ONCHIP_BACKWARD.get(family, backward)
    try:
        with pdma_kernels("onchip" if family in ONCHIP_BACKWARD else family):
            yield
    finally:
        onchip.BACKWARD = backward


def backward_of(family: str, partitions: int) -> str | None:
    """Which backward an on-chip family runs at M = d_p**partitions (None for the other families)."""
    if family not in ONCHIP_BACKWARD:
        return None
    fits = onchip.onchip_backward_fits(D_P**partitions, D_V, DEVICE)
    return "onchip" if family == "onchip" and fits else "triton"


def op_kwargs(q) -> dict:
    """The op's settings for q's key width: U = d_k / d_p partitions, so M = d_p**U."""
    return dict(num_partitions=q.shape[-1] // D_P, topk=TOPK, cape=CAPE)


def op_step(q, k, v, grad, kernels: str, backward: bool, segments: int | None = None):
    kw = op_kwargs(q)

    def run():
        with family_kernels(kernels):
            if not backward:
                with torch.no_grad():
                    return ram_attention(q, k, v, mode="triton", time_segments=segments, **kw)[0]
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]
            o, _ = ram_attention(*leaves, mode="triton", time_segments=segments, **kw)
            return o, *torch.autograd.grad(o, leaves, grad)
    return run


def pdma_only_step(q, k, v, grad, family: str):
    """A table family's PDMA kernels, forward+backward on tokens decoded once, outside the timing."""
    module, name = LAUNCHERS[family]
    kw = op_kwargs(q)
    spec = build_spec(HEADS, q.shape[-1], dtype=torch.float32, device=DEVICE, **kw)
    positions = torch.arange(q.shape[1], device=DEVICE)[None].expand(q.shape[0], -1)
    with torch.no_grad():
        write_idx, write_w, decay, read_idx, read_w = decode_tokens(q.float(), k.float(), spec, positions,
                                                                    use_triton=True)
    leaves = [x.detach().requires_grad_() for x in (write_w, decay, read_w)] + [v.float().requires_grad_()]

    def run():
        with family_kernels(family):
            o, _ = getattr(module, name)(write_idx, leaves[0], leaves[1], read_idx, leaves[2], leaves[3],
                                         memory_slots=D_P ** kw["num_partitions"], eps=1e-6)
            return torch.autograd.grad(o, leaves, grad.float())
    return run


def worst_difference(got, want) -> float:
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()
               for a, b in zip(got, want))


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure_shape(batch: int, seq_len: int, families: list[str], segments: list[int],
                  partitions: int = U) -> list[dict]:
    q, k, v, grad = inputs(batch, seq_len, partitions)
    label = f"B{batch} T{seq_len}" + ("" if partitions == U else f" M{D_P ** partitions}")
    want = op_step(q, k, v, grad, "sorted", True)()
    runs = [(family, None) for family in families] + [("token", n) for n in segments if "token" in families]
    rows = []
    for kernels, n in runs:
        name = kernels if n is None else f"{kernels}, {n} time segments"
        if kernels in ONCHIP_BACKWARD and not onchip.onchip_fits(D_P**partitions, D_V, DEVICE):
            print(f"{label} {name:26s} skipped: a table slice of M {D_P**partitions} does not fit in shared memory",
                  flush=True)
            continue
        reference = (kernels, n) == ("sorted", None)
        diff = 0.0 if reference else worst_difference(op_step(q, k, v, grad, kernels, True, n)(), want)
        row = dict(shape=label, B=batch, T=seq_len, U=partitions, M=D_P**partitions, kernels=kernels, time_segments=n,
                   backward=backward_of(kernels, partitions), check=diff, check_ok=diff <= MISMATCH,
                   fwd_ms=bench(op_step(q, k, v, grad, kernels, False, n)),
                   fwd_bwd_ms=bench(op_step(q, k, v, grad, kernels, True, n)),
                   fwd_bwd_peak_mib=peak_mib(op_step(q, k, v, grad, kernels, True, n)))
        if kernels in LAUNCHERS and n is None:
            row["pdma_fwd_bwd_ms"] = bench(pdma_only_step(q, k, v, grad, kernels))
        rows.append(row)
        print(f"{label} {name:26s} fwd {row['fwd_ms']:8.3f} ms   fwd+bwd {row['fwd_bwd_ms']:8.3f} ms   "
              f"peak {row['fwd_bwd_peak_mib']:8.1f} MiB   vs sorted {diff:.1e}" +
              ("" if row["check_ok"] else " MISMATCH") +
              (f"   (PDMA kernels alone {row['pdma_fwd_bwd_ms']:.3f} ms)" if "pdma_fwd_bwd_ms" in row else "") +
              (f"   backward {row['backward']}" if row["backward"] else ""),
              flush=True)
    return rows


def sweep(batch: int, seq_len: int, family: str) -> list[dict]:
    q, k, v, grad = inputs(batch, seq_len, U)
    want = op_step(q, k, v, grad, "sorted", True)()
    module = LAUNCHERS[family][0]
    defaults = {name: getattr(module, name) for _, change in SWEEP[family] for name in change}
    rows = []
    for label, change in SWEEP[family]:
        for name, value in change.items():
            setattr(module, name, value)
        try:
            diff = worst_difference(op_step(q, k, v, grad, family, True)(), want)
            row = dict(family=family, setting=label, **change, check=diff, check_ok=diff <= MISMATCH,
                       fwd_ms=bench(op_step(q, k, v, grad, family, False)),
                       fwd_bwd_ms=bench(op_step(q, k, v, grad, family, True)))
            print(f"  {family} {label:20s} fwd {row['fwd_ms']:8.3f} ms   fwd+bwd {row['fwd_bwd_ms']:8.3f} ms   "
                  f"check {diff:.1e}", flush=True)
        except Exception as err:  # a setting that does not compile (e.g. out of shared memory)
            row = dict(family=family, setting=label, **change, error=f"{type(err).__name__}: {str(err)[:200]}")
            print(f"  {family} {label:20s} failed: {row['error']}", flush=True)
        finally:
            for name, value in defaults.items():
                setattr(module, name, value)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pdma_kernels.json")
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="B x T, e.g. 8x2048")
    parser.add_argument("--families", type=lambda s: s.split(","), default=FAMILIES,
                        help=f"comma-separated, from {','.join(KNOWN_FAMILIES)} (default {','.join(FAMILIES)}; "
                             "sorted always runs: the reference)")
    parser.add_argument("--time-segments", type=int, nargs="*", default=[],
                        help="also run the token family with each sequence cut into this many pieces")
    parser.add_argument("--partitions", type=int, nargs="+", default=[U],
                        help=f"U values (M = {D_P}**U: 5 is 1024, 8 is 65536), each at every shape: where the "
                             "table families give way to the sorted kernels")
    parser.add_argument("--no-sweep", action="store_true", help="skip the launch settings of the table families")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    unknown = set(args.families) - set(KNOWN_FAMILIES)
    if unknown:
        parser.error(f"--families: unknown {sorted(unknown)}; choose from {KNOWN_FAMILIES}")
    families = ["sorted"] + [f for f in args.families if f != "sorted"]
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    defaults = {family: {name: getattr(LAUNCHERS[family][0], name) for _, change in SWEEP[family] for name in change}
                for family in SWEEP if family in families}
    if any(family in ONCHIP_BACKWARD for family in families):
        defaults["onchip_backward"] = dict(BACKWARD=onchip.BACKWARD, BACKWARD_WIDTH=onchip.BACKWARD_WIDTH,
                                           BACKWARD_PREFETCH=onchip.BACKWARD_PREFETCH)
    meta = dict(**environment("cuda"), timer="triton.testing.do_bench median (warmup 5, rep 40)",
                shape=dict(H=HEADS, d_v=D_V, U=args.partitions, d_p=D_P, M=[D_P**u for u in args.partitions], K=TOPK,
                           dtype="bf16", cape_heads=HEADS // 2),
                launch_defaults=defaults, argv=sys.argv[1:])
    print(f"{meta['device']}, launch defaults {defaults}", flush=True)
    rows, settings = [], []
    for batch, seq_len in shapes:
        for partitions in args.partitions:
            rows += measure_shape(batch, seq_len, families, args.time_segments, partitions)
            _write(args.out, meta, rows, settings)  # a call cut short keeps what it measured
    if not args.no_sweep:
        for family in (f for f in families[1:] if f in SWEEP):
            print(f"{family} launch settings at B{shapes[0][0]} T{shapes[0][1]}:", flush=True)
            settings += sweep(*shapes[0], family)
            _write(args.out, meta, rows, settings)
    print("\n| shape | kernels | time segments | backward | fwd ms | fwd+bwd ms | peak MiB | check |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['shape']} | {row['kernels']} | {row['time_segments'] or ''} | {row['backward'] or ''} | "
              f"{row['fwd_ms']:.3f} | {row['fwd_bwd_ms']:.3f} | {row['fwd_bwd_peak_mib']:.0f} | {row['check']:.1e} |")
    print(f"wrote {args.out}")


def _write(path: Path, meta: dict, rows: list, settings: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(dict(meta=meta, rows=rows, settings=settings), indent=2) + "\n")


if __name__ == "__main__":
    main()
