"""Pick the launch shapes of the Triton kernels on this GPU: times the address decoder and the
PDMA segment kernels (forward+backward, paper layer shape, bf16) over a grid of block sizes and
warp counts, and prints the best. The chosen values are the module defaults in
``ramnet/ops/address/triton.py`` and ``ramnet/ops/pdma/triton_segments.py``.

    python benchmarks/tune_kernels.py [--batch 8 --seq-len 2048]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton.testing

from ramnet.ops import ram_attention
from ramnet.ops.address import triton as address_kernels
from ramnet.ops.address.triton import triton_beam_topk
from ramnet.ops.pdma import triton_segments


def bench(fn) -> float:
    try:
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    except Exception as err:  # a shape that does not compile (e.g. out of shared memory)
        print(f"    failed: {type(err).__name__}: {str(err)[:120]}")
        return float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    gen = torch.Generator("cuda").manual_seed(0)
    shape = (args.batch, args.seq_len, 16)
    q, k = (torch.randn(*shape, 20, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_() for _ in "qk")
    v = torch.randn(*shape, 64, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
    grad = torch.randn_like(v)
    x = torch.stack([k, q]).detach().reshape(-1, 20).float().requires_grad_()
    grad_w = torch.randn(x.shape[0], 8, device="cuda")

    def decoder():
        _, w = triton_beam_topk(x, 5, 8, 1.0)
        w.backward(grad_w)

    print(f"address decoder fwd+bwd, {x.shape[0]} rows (U5 d_p4 K8):")
    results = {}
    for rows, warps in itertools.product([2, 4, 8, 16, 32], [1, 2, 4, 8]):
        address_kernels.ROWS_PER_PROGRAM, address_kernels.NUM_WARPS = rows, warps
        results[rows, warps] = bench(decoder)
        print(f"  rows/program {rows:3d} warps {warps}: {results[rows, warps]:.3f} ms")
    best = min(results, key=results.get)
    print(f"  best: rows/program {best[0]}, warps {best[1]}: {results[best]:.3f} ms")
    address_kernels.ROWS_PER_PROGRAM, address_kernels.NUM_WARPS = best

    def layer_op():
        o, _ = ram_attention(q, k, v, num_partitions=5, topk=8, mode="triton")
        o.backward(grad)

    print(f"ram_attention(mode='triton') fwd+bwd, B{args.batch} T{args.seq_len} H16:")
    results = {}
    for block, warps, chunk in itertools.product([16, 32, 64], [2, 4, 8], [8, 32]):
        triton_segments.BLOCK, triton_segments.NUM_WARPS, triton_segments.MAX_BLOCKS_PER_CHUNK = block, warps, chunk
        results[block, warps, chunk] = bench(layer_op)
        print(f"  block {block:3d} warps {warps} blocks/chunk <= {chunk:2d}: {results[block, warps, chunk]:.3f} ms")
    best = min(results, key=results.get)
    print(f"  best: block {best[0]}, warps {best[1]}, blocks/chunk <= {best[2]}: {results[best]:.3f} ms")
    triton_segments.BLOCK, triton_segments.NUM_WARPS, triton_segments.MAX_BLOCKS_PER_CHUNK = best

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        layer_op()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=50))


if __name__ == "__main__":
    main()
