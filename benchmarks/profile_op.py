"""Where the time of one ``ram_attention`` call goes: torch.profiler over forward+backward in the
paper's layer shape (B8 T2048 H16, d_k 20 = U5 x d_p 4, K 8, d_v 64, bf16), per mode.

    python benchmarks/profile_op.py --modes triton,parallel [--batch 8 --seq-len 2048]
    python benchmarks/profile_op.py --modes triton/sorted,triton/token --batch 256 --seq-len 256

``triton/token`` and ``triton/sorted`` force the Triton path's PDMA kernels (``ram.triton.pdma_kernels``).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from ramnet.ops import ram_attention
from ramnet.ops.ram.triton import pdma_kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="triton,parallel")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=25, help="table rows per mode")
    args = parser.parse_args()
    device = "cuda"
    gen = torch.Generator(device).manual_seed(0)
    shape = (args.batch, args.seq_len, 16)
    q, k = (torch.randn(*shape, 20, device=device, generator=gen, dtype=torch.bfloat16).requires_grad_() for _ in "qk")
    v = torch.randn(*shape, 64, device=device, generator=gen, dtype=torch.bfloat16).requires_grad_()
    grad = torch.randn_like(v)

    for name in args.modes.split(","):
        mode, _, kernels = name.partition("/")

        def step():
            with pdma_kernels(kernels or "auto"):
                o, _ = ram_attention(q, k, v, num_partitions=5, topk=8, mode=mode)
            o.backward(grad)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        print(f"\n== mode {name}: {1e3 * (time.perf_counter() - start) / 5:.2f} ms per fwd+bwd (wall)")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
