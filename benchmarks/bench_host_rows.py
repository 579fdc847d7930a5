"""How fast a kernel gathers random rows of pinned host memory over the bus: the part of the host-resident
state's decoding step (``ramnet/states/offload_kernels.py``, ``plan_fill_kernel``) that limits it at B=16.

A row is the state's d_v + 1 = 65 floats (260 bytes). The host table is ``[rows, stride]`` fp32 in pinned
memory and a Triton kernel loads ``width`` floats of ``n`` random rows (as ``plan_fill_kernel``'s zero-copy
loads: the pinned tensor's address used on the device) into a device tensor. Cases:

- ``stride``: 65 (the rows packed, as today), 68 (16-byte rows), 72 (32-byte rows), 80 (64-byte), 128 (512-byte
  rows, the whole 128-float tile read);
- ``rows_per_program``: 16 (``plan_fill_kernel``: one program per (sequence, head), 2K = 16 lanes) or 1;
- ``n``: 256 (B=1: 16 heads x 16 lanes) and 4096 (B=16).

Each timed launch gathers a fresh set of random rows (no two launches the same, so the GPU's L2 holds few of them);
on CUDA the ``launches`` back-to-back launches are captured in one CUDA graph and ``us`` is the median over repeats
of a replay's time between two events, over ``launches``: the GPU's time, not Python's. (The first version timed
the Python launches themselves: on an H100 every case took 27-33 us, n = 256 as n = 4,096, which was the Triton
launch's host cost.) ``GB/s`` is the useful bytes (``n`` x 65 x 4) over that time. ``--table-rows`` sets the host
table's size (a small table: few pages to translate). A reference row copies the same bytes, contiguous, with
``copy_`` (the DMA engines: the bus's bandwidth for large transfers).

    python benchmarks/bench_host_rows.py --out benchmarks/results/host_rows_h200.json
    TRITON_INTERPRET=1 python benchmarks/bench_host_rows.py --device cpu --quick --out /tmp/host_rows.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from ramnet.files import write_text_atomic
from ramnet.provenance import environment

WIDTH = 65  # d_v + 1 at the paper shape
STRIDES = (65, 68, 72, 80, 128)
TABLE_ROWS = 16 * 16 * 1024  # B=16 x 16 heads x M 1024: the 340M shape's host rows of one layer


@triton.jit
def gather_rows_kernel(src, index, dst, n, STRIDE: tl.constexpr, WIDTH: tl.constexpr, ROWS: tl.constexpr,
                       COLS: tl.constexpr):
    lanes = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = lanes < n
    row = tl.load(index + lanes, mask=live, other=0).to(tl.int64)
    cols = tl.arange(0, COLS)
    mask = live[:, None] & (cols[None, :] < WIDTH)
    x = tl.load(src + row[:, None] * STRIDE + cols[None, :], mask=mask, other=0.0)
    tl.store(dst + lanes[:, None].to(tl.int64) * WIDTH + cols[None, :], x, mask=mask)


def gather(src: torch.Tensor, index: torch.Tensor, dst: torch.Tensor, rows_per_program: int) -> None:
    n = index.numel()
    gather_rows_kernel[(triton.cdiv(n, rows_per_program),)](
        src, index, dst, n, STRIDE=src.shape[1], WIDTH=dst.shape[1], ROWS=rows_per_program,
        COLS=triton.next_power_of_2(dst.shape[1]))


def timed(fn, launches: int, repeats: int, device: torch.device) -> float:
    """Median over ``repeats`` of the mean microseconds of ``launches`` calls ``fn(i)``."""
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(launches):
                fn(i)
            times.append((time.perf_counter() - start) / launches * 1e6)
        return statistics.median(times)
    # One graph of the launches, so that the time is the GPU's, not the host's launching them.
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for i in range(launches):  # warm: compiled, and the caching allocator settled before the capture
            fn(i)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(launches):
            fn(i)
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / launches)
    return statistics.median(times)


def run(device: torch.device, sizes: tuple[int, ...], strides: tuple[int, ...], per_program: tuple[int, ...],
        table_rows: int, launches: int, repeats: int) -> list[dict]:
    pin = device.type == "cuda"
    generator = torch.Generator().manual_seed(0)
    rows = []
    for n in sizes:
        # A fresh set of rows for every launch: one index tensor each.
        indexes = [torch.randint(table_rows, (n,), generator=generator).to(device) for _ in range(launches)]
        dst = torch.empty(n, WIDTH, device=device)
        useful = n * WIDTH * 4
        for stride in strides:
            src = torch.randn(table_rows, stride, generator=generator).pin_memory() if pin else torch.randn(
                table_rows, stride, generator=generator)
            for per in per_program:
                gather(src, indexes[0], dst, per)  # compiles
                expected = src[indexes[0].cpu(), :WIDTH].to(device)
                if not torch.equal(dst, expected):
                    raise SystemExit(f"stride {stride}, {per} rows a program: the gathered rows differ")
                us = timed(lambda i: gather(src, indexes[i], dst, per), launches, repeats, device)
                rows.append(dict(case="gather", n=n, stride=stride, rows_per_program=per, us=us,
                                 gb_s=useful / us / 1e3))
                print(f"gather n={n:5d} stride={stride:4d} rows/program={per:3d}: {us:8.2f} us "
                      f"{useful / us / 1e3:7.2f} GB/s", flush=True)
            del src
        if pin:  # the same bytes, contiguous, by the DMA engines
            src = torch.randn(n, WIDTH).pin_memory()
            out = torch.empty(n, WIDTH, device=device)
            us = timed(lambda i: out.copy_(src, non_blocking=True), launches, repeats, device)
            rows.append(dict(case="copy_", n=n, stride=WIDTH, rows_per_program=None, us=us, gb_s=useful / us / 1e3))
            print(f"copy_  n={n:5d} contiguous: {us:8.2f} us {useful / us / 1e3:7.2f} GB/s", flush=True)
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"Random rows of pinned host memory gathered by a kernel: {meta['device']}; torch {meta['torch']}, "
             f"triton {meta['triton']}; commit {meta['git_rev']}; {WIDTH} fp32 of each row, a fresh set of rows "
             f"each launch, table {meta['table_rows']} rows.", "",
             "| case | rows (n) | row stride, floats | rows a program | us | GB/s (useful) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        per = "-" if r["rows_per_program"] is None else r["rows_per_program"]
        lines.append(f"| {r['case']} | {r['n']} | {r['stride']} | {per} | {r['us']:.2f} | {r['gb_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="two small cases (the interpreter's smoke test)")
    parser.add_argument("--launches", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--table-rows", type=int, default=TABLE_ROWS, help="rows of the host table")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        sizes, strides, per, table, launches, repeats = (8,), (65, 72), (4,), 64, 2, 1
    else:
        sizes, strides, per, table = (256, 4096), STRIDES, (16, 1), args.table_rows
        launches, repeats = args.launches, args.repeats
    rows = run(device, sizes, strides, per, table, launches, repeats)
    meta = dict(environment(device), issue=18, width=WIDTH, table_rows=table, launches=launches, repeats=repeats,
                timer="one CUDA graph of the launches, replayed" if device.type == "cuda" else "perf_counter")
    out = Path(args.out)
    write_text_atomic(out, json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    write_text_atomic(out.with_suffix(".md"), markdown(meta, rows))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
