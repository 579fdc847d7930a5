"""Pick the launch shapes of the Triton kernels on this GPU: times the address decoder and the
PDMA kernels (forward+backward, paper layer shape, bf16) over a grid of group sizes, program counts
and warp counts, and prints the best. The chosen values are the module defaults in
``ramnet/ops/address/triton.py`` and ``ramnet/ops/pdma/triton_segments.py``.

    python benchmarks/tune_kernels.py [--batch 8 --seq-len 2048] [--only pdma] [--write]

``--write`` rewrites those defaults in the source files with the best values found.
"""

from __future__ import annotations

import argparse
import itertools
import re
from pathlib import Path

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


def search(grid, fn, module, names):
    """Time ``fn`` with every combination of ``grid`` set as ``module``'s ``names``; keep the best."""
    results = {}
    for values in grid:
        for name, value in zip(names, values):
            setattr(module, name, value)
        results[values] = bench(fn)
        print("  " + " ".join(f"{n.lower()} {v}" for n, v in zip(names, values)) + f": {results[values]:.3f} ms")
    best = min(results, key=results.get)
    for name, value in zip(names, best):
        setattr(module, name, value)
    print(f"  {results[best]:.3f} ms at the best")
    return best


def write_defaults(module, names, values) -> None:
    """Rewrite ``NAME = <int>`` at the start of a line in ``module``'s source, keeping its comment."""
    path = Path(module.__file__)
    source = path.read_text()
    for name, value in zip(names, values):
        source, count = re.subn(rf"^{name} = \d+", f"{name} = {value}", source, flags=re.M)
        if count != 1:
            raise RuntimeError(f"{path}: expected one line '{name} = <int>', found {count}")
    path.write_text(source)
    print(f"  wrote {', '.join(f'{n} = {v}' for n, v in zip(names, values))} to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--only", choices=["decoder", "pdma"], help="tune one of the two only")
    parser.add_argument("--write", action="store_true", help="make the best values the source defaults")
    args = parser.parse_args()
    tune = lambda part: args.only in (None, part)  # noqa: E731
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

    if tune("decoder"):
        print(f"address decoder fwd+bwd, {x.shape[0]} rows (U5 d_p4 K8):")
        grid = itertools.product([4, 8, 16, 32, 64], [1, 2, 4])
        names = ("ROWS_PER_PROGRAM", "NUM_WARPS")
        best = search(grid, decoder, address_kernels, names)
        print(f"  best: rows/program {best[0]}, warps {best[1]}")
        if args.write:
            write_defaults(address_kernels, names, best)

    def layer_op():
        o, _ = ram_attention(q, k, v, num_partitions=5, topk=8, mode="triton")
        o.backward(grad)

    if tune("pdma"):
        print(f"ram_attention(mode='triton'), PDMA kernels, fwd+bwd, B{args.batch} T{args.seq_len} H16:")
        grid = itertools.product([4, 8, 16], [1], [4096, 16384, 65536])
        names = ("GROUP", "NUM_WARPS", "TARGET_PROGRAMS")
        best = search(grid, layer_op, triton_segments, names)
        print(f"  best: group {best[0]}, warps {best[1]}, target programs {best[2]}")
        if args.write:
            write_defaults(triton_segments, names, best)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        layer_op()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=50))


if __name__ == "__main__":
    main()
