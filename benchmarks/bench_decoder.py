"""The address decoder's forward, Triton against CUDA C (``ramnet/ops/address/cuda.py``), in one process:
``triton_beam_topk`` with ``address.cuda.DECODER`` "triton" and then "cuda", forward (no grad) and
forward+backward (the backward is the Triton one either way), ``triton.testing.do_bench`` medians, on
``--rows`` rows (524,288: B8 T2048 H16, a key and a query each) of bf16 logits with a CAPE shift, at
each ``--shapes`` U x d_p x K (the paper's 5x4x8 by default). Before timing a shape, the two forwards
are checked to agree: the same slots in the same order, weights to 4e-6 relative, and the gradients.
The first CUDA C call's NVRTC compile is timed on its own.

    python benchmarks/bench_decoder.py --out /tmp/decoder.json [--rows 524288] [--shapes 5x4x8 6x4x8 3x8x8]
    python benchmarks/bench_decoder.py --out /tmp/decoder.json --op 8x2048 1x32768   # and the whole op

Writes the JSON and a markdown table beside it (``.md``). CUDA only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton.testing

from ramnet.files import write_text_atomic
from ramnet.ops.address import cuda as cuda_decoder
from ramnet.ops.address.triton import triton_beam_topk
from ramnet.provenance import environment

sys.path.insert(0, str(Path(__file__).parent))
import bench_pdma_kernels  # noqa: E402  (beside this script: the op's inputs and timed step)

TAU = 1.0
RTOL = 4e-6  # the weights' agreement (tests/ops/test_address_cuda.py's RTOL_TRITON)


def parse_shape(text: str) -> tuple[int, int, int]:
    num_partitions, d_p, topk = (int(v) for v in text.lower().split("x"))
    return num_partitions, d_p, topk


def inputs(rows: int, num_partitions: int, d_p: int, seed: int = 0):
    gen = torch.Generator("cuda").manual_seed(seed)
    x = (torch.randn(rows, num_partitions * d_p, device="cuda", generator=gen) * 2).to(torch.bfloat16)
    shift = torch.randint(0, 2**20, (rows,), device="cuda", generator=gen)
    return x, shift


def decode(decoder: str, x, shift, num_partitions: int, topk: int, grad: bool):
    cuda_decoder.DECODER = decoder
    leaf = x.detach().requires_grad_(grad)
    index, weight = triton_beam_topk(leaf, num_partitions, topk, TAU, shift=shift)
    if not grad:
        return index, weight, None
    (grad_x,) = torch.autograd.grad(weight, leaf, torch.ones_like(weight))
    return index, weight, grad_x


def check(x, shift, num_partitions: int, topk: int) -> dict:
    """The two forwards on the same rows: slots and order, weights, and the gradient through each."""
    index, weight, grad = decode("cuda", x, shift, num_partitions, topk, grad=True)
    ref_index, ref_weight, ref_grad = decode("triton", x, shift, num_partitions, topk, grad=True)
    rows_differ = int((index != ref_index).any(-1).sum())
    rel = ((weight - ref_weight).abs() / ref_weight.abs().clamp_min(1e-30)).max().item()
    grad_diff = (grad.float() - ref_grad.float()).abs().max().item()
    result = dict(rows_differ=rows_differ, weight_max_rel=rel, grad_max_abs_diff=grad_diff,
                  grad_max_abs=ref_grad.float().abs().max().item())
    if rows_differ or rel > RTOL:
        raise AssertionError(f"the CUDA C and Triton forwards disagree: {result}")
    return result


def measure(rows: int, shape: tuple[int, int, int]) -> list[dict]:
    num_partitions, d_p, topk = shape
    x, shift = inputs(rows, num_partitions, d_p)
    fits = cuda_decoder.cuda_decoder_fits(x.shape[1], num_partitions, topk, x.device)
    label = dict(U=num_partitions, d_p=d_p, K=topk, M=d_p**num_partitions, rows=rows, dtype="bf16")
    if not fits:
        return [dict(label, decoder="cuda", error="outside the CUDA C decoder's domain")]
    torch.cuda.synchronize()
    start = time.perf_counter()
    decode("cuda", x[:1], shift[:1], num_partitions, topk, grad=False)  # the NVRTC compile
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    agreement = check(x, shift, num_partitions, topk)
    out = []
    for decoder in ("triton", "cuda"):
        row = dict(label, decoder=decoder)
        for key, grad in (("fwd_ms", False), ("fwd_bwd_ms", True)):
            def run():
                if grad:
                    decode(decoder, x, shift, num_partitions, topk, grad=True)
                else:
                    with torch.no_grad():
                        decode(decoder, x, shift, num_partitions, topk, grad=False)
            row[key] = triton.testing.do_bench(run, warmup=10, rep=100, return_mode="median")
        if decoder == "cuda":
            row.update(compile_s=compile_s, **agreement)
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def measure_op(batch: int, seq_len: int) -> list[dict]:
    """The whole op at the paper's layer shape, ``bench_pdma_kernels``'s inputs and step (``ram_attention(mode=
    "triton")``, the slot-sorted PDMA kernels), forward and forward+backward, under each decoder."""
    q, k, v, grad = bench_pdma_kernels.inputs(batch, seq_len, bench_pdma_kernels.U)
    out = []
    for decoder in ("triton", "cuda"):
        cuda_decoder.DECODER = decoder
        row = dict(op=f"B{batch} T{seq_len}", decoder=decoder)
        for key, backward in (("fwd_ms", False), ("fwd_bwd_ms", True)):
            row[key] = bench_pdma_kernels.bench(bench_pdma_kernels.op_step(q, k, v, grad, "sorted", backward))
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"The address decoder's forward, Triton and CUDA C (`address.cuda.DECODER`): {meta['device']}; torch "
             f"{meta['torch']}, triton {meta['triton']}; commit {meta['git_rev']}; bf16 logits with a CAPE shift, "
             f"tau {TAU}; do_bench medians (the backward is the Triton one in both).", "",
             "| U x d_p x K | M | rows | decoder | fwd ms | fwd+bwd ms |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "op" in r:
            continue
        if "error" in r:
            lines.append(f"| {r['U']}x{r['d_p']}x{r['K']} | {r['M']} | {r['rows']} | {r['decoder']} | {r['error']} | |")
            continue
        lines.append(f"| {r['U']}x{r['d_p']}x{r['K']} | {r['M']} | {r['rows']} | {r['decoder']} | {r['fwd_ms']:.3f} | "
                     f"{r['fwd_bwd_ms']:.3f} |")
    ops = [r for r in rows if "op" in r]
    if ops:
        lines += ["", "The whole op, `ram_attention(mode=\"triton\")` (bench_pdma_kernels.py's shape and inputs, "
                  "slot-sorted PDMA kernels), under each decoder:", "", "| op | decoder | fwd ms | fwd+bwd ms |",
                  "|---|---|---|---|"]
        lines += [f"| {r['op']} | {r['decoder']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} |" for r in ops]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSON; the markdown goes beside it (.md)")
    parser.add_argument("--rows", type=int, default=524_288, help="rows decoded (B * T * H * 2)")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(5, 4, 8)], help="U x d_p x K, e.g. 5x4x8")
    parser.add_argument("--op", nargs="*", default=[], metavar="BxT",
                        help="also the whole op (ram_attention) at these batch x length shapes, e.g. 8x2048")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    meta = dict(environment("cuda"), tau=TAU, rtol=RTOL)
    rows = []
    default = cuda_decoder.DECODER
    try:
        for shape in args.shapes:
            rows += measure(args.rows, shape)
            write_text_atomic(args.out, json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
        for text in args.op:
            batch, seq_len = (int(v) for v in text.lower().split("x"))
            rows += measure_op(batch, seq_len)
            write_text_atomic(args.out, json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    finally:
        cuda_decoder.DECODER = default
    write_text_atomic(args.out.with_suffix(".md"), markdown(meta, rows))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
