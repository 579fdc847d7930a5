"""The Triton path's two PDMA kernel families side by side: chunked (``ops/pdma/chunk_triton.py``)
against slot-sorted (``ops/pdma/triton.py``), through ``ram_attention(..., mode="triton")`` with
each forced (``ram.triton.pdma_kernels``), at the paper's layer shape (H 16, d_v 64, U 5 x d_p 4 so
M 1024, K 8, bf16) and B x T in {8 x 2048, 2 x 8192, 1 x 32768}.

Per shape: first the two families' outputs and input gradients against each other (the largest
difference over the largest value), then ``triton.testing.do_bench`` medians of the forward (no
grad) and of forward+backward, the peak memory of forward+backward over the inputs, and the chunked
PDMA kernels alone (fwd+bwd on tokens decoded beforehand). Then, at the first shape, the chunked
kernels' launch settings (warps, d_v slices, precision of the products with v): each setting
compiles the kernels again (tens of seconds; about 3 minutes in all).

    python benchmarks/bench_chunk_pdma.py [--out benchmarks/results/chunk_pdma_h200.json]
    python benchmarks/bench_chunk_pdma.py --shapes 8x2048 --no-sweep    # the quickest
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton.testing

from ramnet.files import write_text_atomic
from ramnet.ops import ram_attention
from ramnet.ops.pdma import chunk_triton
from ramnet.ops.ram.common import decode_tokens
from ramnet.ops.ram.spec import build_spec
from ramnet.ops.ram.triton import pdma_kernels
from ramnet.provenance import environment

HEADS, D_V, U, D_P, TOPK = 16, 64, 5, 4, 8
OP = dict(num_partitions=U, topk=TOPK, cape=torch.tensor([h % 2 == 0 for h in range(HEADS)]))
SHAPES = ["8x2048", "2x8192", "1x32768"]
# Launch settings of the chunked kernels tried at the first shape: module constants of chunk_triton.
# At B8 (128 sequence-head pairs) the default TARGET_PROGRAMS gives 4 slices of 16 columns.
SWEEP = [
    ("4 warps", dict(NUM_WARPS=4)),
    ("2 slices", dict(TARGET_PROGRAMS=256)),
    ("1 slice", dict(TARGET_PROGRAMS=0)),
    ("ieee products", dict(DOT_PRECISION="ieee")),
]
MISMATCH = 2e-2  # bf16 outputs and gradients: a few bf16 ulps of the largest value
DEVICE = "cuda"


def inputs(batch: int, seq_len: int):
    gen = torch.Generator(DEVICE).manual_seed(0)
    shape = (batch, seq_len, HEADS)
    q, k = (torch.randn(*shape, U * D_P, device=DEVICE, generator=gen, dtype=torch.bfloat16) for _ in "qk")
    v = torch.randn(*shape, D_V, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    return q, k, v, torch.randn_like(v)


def op_step(q, k, v, grad, kernels: str, backward: bool):
    def run():
        with pdma_kernels(kernels):
            if not backward:
                with torch.no_grad():
                    return ram_attention(q, k, v, mode="triton", **OP)[0]
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]
            o, _ = ram_attention(*leaves, mode="triton", **OP)
            return o, *torch.autograd.grad(o, leaves, grad)
    return run


def pdma_only_step(q, k, v, grad):
    """The chunked kernels' forward+backward on tokens decoded once, outside the timing."""
    spec = build_spec(HEADS, U * D_P, dtype=torch.float32, device=DEVICE, **OP)
    positions = torch.arange(q.shape[1], device=DEVICE)[None].expand(q.shape[0], -1)
    with torch.no_grad():
        write_idx, write_w, decay, read_idx, read_w = decode_tokens(q.float(), k.float(), spec, positions,
                                                                    use_triton=True)
    leaves = [x.detach().requires_grad_() for x in (write_w, decay, read_w)] + [v.float().requires_grad_()]

    def run():
        o, _ = chunk_triton.chunk_pdma_triton(write_idx, leaves[0], leaves[1], read_idx, leaves[2], leaves[3],
                                              memory_slots=D_P**U, eps=1e-6)
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


def measure_shape(batch: int, seq_len: int) -> list[dict]:
    q, k, v, grad = inputs(batch, seq_len)
    label = f"B{batch} T{seq_len}"
    diff = worst_difference(op_step(q, k, v, grad, "chunked", True)(), op_step(q, k, v, grad, "sorted", True)())
    status = "ok" if diff <= MISMATCH else "MISMATCH"
    print(f"{label}: chunked vs sorted, outputs and gradients differ by {diff:.2e} of the largest ({status})",
          flush=True)
    rows = []
    for kernels in ("sorted", "chunked"):
        row = dict(shape=label, B=batch, T=seq_len, kernels=kernels, check=diff, check_ok=diff <= MISMATCH,
                   fwd_ms=bench(op_step(q, k, v, grad, kernels, False)),
                   fwd_bwd_ms=bench(op_step(q, k, v, grad, kernels, True)),
                   fwd_bwd_peak_mib=peak_mib(op_step(q, k, v, grad, kernels, True)))
        if kernels == "chunked":
            row["pdma_fwd_bwd_ms"] = bench(pdma_only_step(q, k, v, grad))
        rows.append(row)
        print(f"  {kernels:8s} fwd {row['fwd_ms']:8.3f} ms   fwd+bwd {row['fwd_bwd_ms']:8.3f} ms   "
              f"peak {row['fwd_bwd_peak_mib']:8.1f} MiB" +
              (f"   (PDMA kernels alone {row['pdma_fwd_bwd_ms']:.3f} ms)" if "pdma_fwd_bwd_ms" in row else ""),
              flush=True)
    return rows


def sweep(batch: int, seq_len: int) -> list[dict]:
    q, k, v, grad = inputs(batch, seq_len)
    want = op_step(q, k, v, grad, "sorted", True)()
    defaults = {name: getattr(chunk_triton, name) for _, change in SWEEP for name in change}
    rows = []
    for label, change in SWEEP:
        for name, value in change.items():
            setattr(chunk_triton, name, value)
        try:
            diff = worst_difference(op_step(q, k, v, grad, "chunked", True)(), want)
            row = dict(setting=label, **change, check=diff, check_ok=diff <= MISMATCH,
                       fwd_ms=bench(op_step(q, k, v, grad, "chunked", False)),
                       fwd_bwd_ms=bench(op_step(q, k, v, grad, "chunked", True)))
            print(f"  {label:14s} fwd {row['fwd_ms']:8.3f} ms   fwd+bwd {row['fwd_bwd_ms']:8.3f} ms   "
                  f"check {diff:.1e}", flush=True)
        except Exception as err:  # a setting that does not compile (e.g. out of shared memory)
            row = dict(setting=label, **change, error=f"{type(err).__name__}: {str(err)[:200]}")
            print(f"  {label:14s} failed: {row['error']}", flush=True)
        finally:
            for name, value in defaults.items():
                setattr(chunk_triton, name, value)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "chunk_pdma.json")
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="B x T, e.g. 8x2048")
    parser.add_argument("--no-sweep", action="store_true", help="skip the launch settings of the chunked kernels")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    defaults = dict(CHUNK=chunk_triton.CHUNK, NUM_WARPS=chunk_triton.NUM_WARPS,
                    TARGET_PROGRAMS=chunk_triton.TARGET_PROGRAMS, DOT_PRECISION=chunk_triton.DOT_PRECISION)
    meta = dict(**environment("cuda"), timer="triton.testing.do_bench median (warmup 5, rep 40)",
                shape=dict(H=HEADS, d_v=D_V, U=U, d_p=D_P, M=D_P**U, K=TOPK, dtype="bf16", cape_heads=HEADS // 2),
                chunked_defaults=defaults, argv=sys.argv[1:])
    print(f"{meta['device']}, chunked defaults {defaults}", flush=True)
    rows = [row for batch, seq_len in shapes for row in measure_shape(batch, seq_len)]
    settings = []
    if not args.no_sweep:
        print(f"chunked launch settings at B{shapes[0][0]} T{shapes[0][1]} (each one change from the defaults):",
              flush=True)
        settings = sweep(*shapes[0])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(dict(meta=meta, rows=rows, settings=settings), indent=2) + "\n")
    print("\n| shape | kernels | fwd ms | fwd+bwd ms | peak MiB | check |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['shape']} | {row['kernels']} | {row['fwd_ms']:.3f} | {row['fwd_bwd_ms']:.3f} | "
              f"{row['fwd_bwd_peak_mib']:.0f} | {row['check']:.1e} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
