"""RAM attention (parallel path) forward+backward against causal SDPA, on the CPU by default.

RAM-Net in the paper's head shape (H=16, d_v=64, U=5, d_p=4, K=8) and SDPA with head dim 64, same
B and T, measured side by side in one process. Reports median times, the ratio and the peak memory
each adds while it runs (CPU: Linux VmHWM, reset before each case; CUDA: the allocator's peak).

    python benchmarks/bench_cpu.py                   # T in 1024, 4096, 16384
    python benchmarks/bench_cpu.py --seq-lens 1024 --repeats 3
    python benchmarks/bench_cpu.py --device cuda     # the same torch code on a GPU (fp32)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ramnet.files import write_text_atomic
from ramnet.ops import ram_attention
from ramnet.provenance import environment

HEADS, D_V, U, D_P, TOPK = 16, 64, 5, 4, 8


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _track_big_allocations() -> None:
    """Make glibc map every allocation over 1 MiB on its own (M_MMAP_THRESHOLD), so that freeing a
    tensor returns its pages and resident memory follows live tensors, not the allocator's pool."""
    if (libc := _libc()) is not None:
        libc.mallopt(-3, 1 << 20)


def _release_free_memory() -> None:
    if (libc := _libc()) is not None:
        libc.malloc_trim(0)


def _peak_rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def ram_step(seq_len: int, device: str):
    q = torch.randn(1, seq_len, HEADS, U * D_P, device=device, requires_grad=True)
    k = torch.randn(1, seq_len, HEADS, U * D_P, device=device, requires_grad=True)
    v = torch.randn(1, seq_len, HEADS, D_V, device=device, requires_grad=True)

    def run():
        o, _ = ram_attention(q, k, v, num_partitions=U, topk=TOPK, mode="parallel")
        o.sum().backward()

    return run


def sdpa_step(seq_len: int, device: str):
    q, k, v = (torch.randn(1, HEADS, seq_len, D_V, device=device, requires_grad=True) for _ in range(3))

    def run():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    return run


def time_case(run, repeats: int, device: str) -> list[float]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    run()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return times


def peak_memory(run, device: str) -> int | None:
    """Bytes the case adds at its peak, over what was allocated before it ran."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        return torch.cuda.max_memory_allocated() - before
    _release_free_memory()
    if not _peak_rss_reset():
        return None
    before = _rss("VmRSS")
    run()
    return _rss("VmHWM") - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, help="JSON results (default: benchmarks/results/<device>_op.json)")
    args = parser.parse_args()
    args.out = args.out or Path(__file__).parent / "results" / f"{args.device}_op.json"

    cases = [(t, name, step) for t in args.seq_lens for name, step in (("ram_parallel", ram_step), ("sdpa", sdpa_step))]
    rows = []
    for seq_len, name, step in tqdm(cases, desc="timing"):
        times = time_case(step(seq_len, args.device), args.repeats, args.device)
        rows.append({"impl": name, "T": seq_len, "median_s": statistics.median(times), "times_s": times})
    # Memory after all timings: the allocator setting it needs would slow the timed runs.
    if args.device == "cpu":
        _track_big_allocations()
    for row, (seq_len, _, step) in zip(rows, tqdm(cases, desc="peak memory")):
        row["peak_extra_bytes"] = peak_memory(step(seq_len, args.device), args.device)

    meta = dict(environment(args.device), cpu_threads=torch.get_num_threads(),
                shape=dict(B=1, H=HEADS, d_v=D_V, U=U, d_p=D_P, K=TOPK, sdpa_head_dim=D_V), **{"pass": "forward+backward"})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")

    print(f"\n{meta['device']}, torch {meta['torch']} ({meta['git_rev']}); fwd+bwd medians")
    print("| T | RAM-Net parallel (s) | SDPA causal (s) | ratio RAM/SDPA | RAM peak extra (MiB) | SDPA peak extra (MiB) |")
    print("|---|---|---|---|---|---|")
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:.0f}"  # noqa: E731
    for seq_len in args.seq_lens:
        ram, sdpa = (next(r for r in rows if r["T"] == seq_len and r["impl"] == n) for n in ("ram_parallel", "sdpa"))
        print(f"| {seq_len} | {ram['median_s']:.3f} | {sdpa['median_s']:.3f} | {ram['median_s'] / sdpa['median_s']:.2f} "
              f"| {mib(ram['peak_extra_bytes'])} | {mib(sdpa['peak_extra_bytes'])} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
