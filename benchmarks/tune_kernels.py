"""Pick the launch shapes of the Triton kernels on this GPU: times the address decoder and the
PDMA kernels (forward+backward, paper layer shape, bf16) over a grid of group sizes, program counts
and warp counts, and prints the best. The chosen values are the module defaults in
``ramnet/ops/address/triton.py`` and ``ramnet/ops/pdma/triton.py``.

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
from ramnet.ops.address import beam_topk, cape_shift
from ramnet.ops.address import triton as address_kernels
from ramnet.ops.address.triton import triton_beam_topk
from ramnet.ops.pdma import triton as pdma_triton
from ramnet.ops.ram.triton import pdma_kernels


DEVICE = "cuda"  # the checks run on CPU too, under TRITON_INTERPRET=1


def bench(fn) -> float:
    try:
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    except Exception as err:  # a shape that does not compile (e.g. out of shared memory)
        print(f"    failed: {type(err).__name__}: {str(err)[:120]}")
        return float("inf")


def search(grid, fn, module, names, check):
    """Time ``fn`` with every combination of ``grid`` set as ``module``'s ``names``; keep the best.
    A combination whose results ``check()`` rejects (it returns a message) is not timed."""
    results = {}
    for values in grid:
        for name, value in zip(names, values):
            setattr(module, name, value)
        label = "  " + " ".join(f"{n.lower()} {v}" for n, v in zip(names, values))
        wrong = check()
        results[values] = float("inf") if wrong else bench(fn)
        print(label + (f": wrong results ({wrong})" if wrong else f": {results[values]:.3f} ms"))
    best = min(results, key=results.get)
    for name, value in zip(names, best):
        setattr(module, name, value)
    print(f"  {results[best]:.3f} ms at the best")
    return best


def check_decoder() -> str | None:
    """The decoder against the torch reference, with a CAPE shift, on small shapes (the backward
    once gave wrong gradients at one launch shape only)."""
    for num_partitions, d_p, topk in [(5, 4, 8), (4, 6, 1), (3, 5, 7)]:
        gen = torch.Generator(DEVICE).manual_seed(num_partitions)
        x = (torch.randn(517, num_partitions * d_p, device=DEVICE, generator=gen) * 2).requires_grad_()
        shift = torch.randint(-10**6, 10**6, (x.shape[0],), device=DEVICE, generator=gen)
        slots = d_p**num_partitions
        index, weight = triton_beam_topk(x, num_partitions, topk, 0.7, shift=shift)
        ref_index, ref_weight = beam_topk(x, num_partitions, topk, 0.7)
        ref_index = cape_shift(ref_index[:, None, None, :], shift[:, None], torch.tensor([True], device=DEVICE),
                               slots)[:, 0, 0]
        per_slot = torch.randn(slots, device=DEVICE, generator=gen)
        grads = [torch.autograd.grad((w * per_slot[i]).sum(), x)[0] for i, w in ((index, weight), (ref_index, ref_weight))]
        if not torch.equal(index.sort(-1).values, ref_index.sort(-1).values):
            return f"U{num_partitions} d_p{d_p} K{topk}: other slots"
        if not torch.allclose(*grads, rtol=1e-3, atol=1e-5):
            return f"U{num_partitions} d_p{d_p} K{topk}: gradient off by {(grads[0] - grads[1]).abs().max().item():.2g}"
    return None


def check_pdma(seq_len: int = 300) -> str | None:
    """The Triton op against the torch parallel path (outputs and input gradients), CAPE on."""
    gen = torch.Generator(DEVICE).manual_seed(0)
    q, k = (torch.randn(2, seq_len, 4, 12, device=DEVICE, generator=gen).requires_grad_() for _ in "qk")
    v = torch.randn(2, seq_len, 4, 16, device=DEVICE, generator=gen).requires_grad_()
    grad = torch.randn(2, seq_len, 4, 16, device=DEVICE, generator=gen)
    kw = dict(num_partitions=3, topk=5, cape=torch.tensor([True, False, True, False]))
    with pdma_kernels("sorted"):  # the kernels these launch shapes are for
        fast = torch.autograd.grad(ram_attention(q, k, v, mode="triton", **kw)[0], [q, k, v], grad)
    ref = torch.autograd.grad(ram_attention(q, k, v, mode="parallel", **kw)[0], [q, k, v], grad)
    worst = max((a - b).abs().max().item() / (b.abs().max().item() + 1e-6) for a, b in zip(fast, ref))
    return f"gradients off by {worst:.2g} of their largest" if worst > 1e-3 else None


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
        best = search(grid, decoder, address_kernels, names, check_decoder)
        print(f"  best: rows/program {best[0]}, warps {best[1]}")
        if args.write:
            write_defaults(address_kernels, names, best)

    def layer_op():
        with pdma_kernels("sorted"):  # the slot-sorted kernels, whose launch shape this tunes
            o, _ = ram_attention(q, k, v, num_partitions=5, topk=8, mode="triton")
        o.backward(grad)

    if tune("pdma"):
        print(f"ram_attention(mode='triton'), PDMA kernels, fwd+bwd, B{args.batch} T{args.seq_len} H16:")
        grid = itertools.product([4, 8, 16], [1], [4096, 16384, 65536])
        names = ("GROUP", "NUM_WARPS", "TARGET_PROGRAMS")
        best = search(grid, layer_op, pdma_triton, names, check_pdma)
        print(f"  best: group {best[0]}, warps {best[1]}, target programs {best[2]}")
        if args.write:
            write_defaults(pdma_triton, names, best)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        layer_op()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=50))


if __name__ == "__main__":
    main()
