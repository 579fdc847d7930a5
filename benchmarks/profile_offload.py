"""Where the host-resident state's decoding step spends its time, against the dense state's: the torch profiler
over N eager steps of ``bench_offload.py``'s model (a random state at a context of 1024 tokens), the device time
of each kernel per layer and step (its summed durations / (N * layers)) and its launches per step.

    python benchmarks/profile_offload.py --batch 16 --budget 0.1          # the 340M shape, M 1024, one GPU
    python benchmarks/profile_offload.py --smoke                          # CPU, a tiny model: op times instead
    python benchmarks/profile_offload.py --batch 16 --plan-warps 8        # plan_fill_kernel's warps (PLAN_WARPS)
    python benchmarks/profile_offload.py --batch 16 --host-device cuda    # the host table in device memory

``--host-device cuda`` keeps the host table in device memory (``OffloadState(host_device=...)``): the same
kernels and moves without the bus, so the difference to the default run is what the bus costs each kernel.

Eager steps launch the same kernels as the captured ones (``bench_offload.py --graph``), so the per-kernel times
hold for both; the host's launch time is not in them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from bench_offload import GEOMETRIES, SHAPE_340M, SMOKE_GEOMETRIES, SMOKE_SHAPE, build_model, make_cache  # noqa: E402

from ramnet.models.ramnet.modeling_ramnet import CACHE_FIELD  # noqa: E402
from ramnet.states import offload as offload_state  # noqa: E402


@torch.no_grad()
def kernel_times(model, cache, batch: int, steps: int, device: str) -> list[tuple[float, int, str]]:
    """``(us per layer and step, launches per step, name)`` of every kernel (CPU: op) over ``steps`` steps."""
    token = torch.ones(batch, 1, dtype=torch.long, device=device)

    def step(token):
        return model(input_ids=token, **{CACHE_FIELD: cache}, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)

    for _ in range(3):  # compiles, allocates, warms the cache
        token = step(token)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            token = step(token)
        if cuda:
            torch.cuda.synchronize()
    layers = model.config.num_hidden_layers
    rows = []
    for event in prof.key_averages():
        total = event.device_time_total if cuda else event.self_cpu_time_total
        if total > 0:
            rows.append((total / steps / layers, event.count // steps, event.key))
    return sorted(rows, reverse=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--budget", type=float, default=0.1, help="the offloaded cache's budget (a fraction of M)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, default=12, help="kernels shown per state")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU (seconds)")
    parser.add_argument("--plan-warps", type=int, default=None,
                        help="warps of each plan_fill_kernel program (default: ramnet.states.offload.PLAN_WARPS)")
    parser.add_argument("--host-device", default="cpu", choices=("cpu", "cuda"),
                        help="where the offloaded state's host table lives (cuda: device memory, no bus)")
    args = parser.parse_args(argv)
    if args.plan_warps is not None and args.plan_warps not in (1, 2, 4, 8, 16):
        parser.error(f"--plan-warps must be 1, 2, 4, 8 or 16, got {args.plan_warps}")
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if args.host_device == "cuda" and device != "cuda":
        parser.error("--host-device cuda needs a CUDA GPU (and no --smoke)")
    shape, geometry = (SMOKE_SHAPE, SMOKE_GEOMETRIES[64]) if args.smoke else (SHAPE_340M, GEOMETRIES[1024])
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_model(shape, geometry, device, dtype)
    what = "device us" if device == "cuda" else "CPU us (self)"
    plan_warps = offload_state.PLAN_WARPS
    if args.plan_warps is not None:
        offload_state.PLAN_WARPS = args.plan_warps
    try:
        for kind, budget in (("dense", None), ("offload", args.budget)):
            cache = make_cache(model, kind, budget, "lru", args.batch, 1024, device, args.host_device)
            rows = kernel_times(model, cache, args.batch, args.steps, device)
            label = kind if budget is None else (f"{kind} {budget:g}, plan warps {offload_state.PLAN_WARPS}, host "
                                                 f"table on {args.host_device}")
            print(f"== {label}, B={args.batch}, {device}: {what} per layer and step, launches per step, name")
            for us, count, name in rows[: args.rows]:
                print(f"{us:9.2f}  {count:5d}  {name[:90]}")
            del cache
    finally:
        offload_state.PLAN_WARPS = plan_warps
    return 0


if __name__ == "__main__":
    sys.exit(main())
