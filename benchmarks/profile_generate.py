"""Where an eager decoding step of ``model.generate`` spends its time: the torch profiler over two calls
(N new tokens and 1), their difference divided by N - 1, so the prompt's prefill cancels out.

Per decoding step of the whole batch: the kernels launched, the GPU's busy time (their summed durations),
the host's wall time, and the top-level ops by count and by host time (an eager step is bound by the host
launching small kernels, not by the GPU: what the op counts say is what fusing or capturing would save).

    python benchmarks/profile_generate.py --loop eager --batch 1 --prompt 512 --new-tokens 33
    python benchmarks/profile_generate.py --device cpu --tiny --new-tokens 5     # seconds, no GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import build_model, generate_kwargs  # noqa: E402  (beside this script)

LOOPS = {"eager": "eager", "hf_loop": "hf_loop", "graph": "default"}  # --loop -> bench_generate's mode


def profiled_call(model, ids, new_tokens: int, kwargs: dict, device: str):
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    if device == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.events()
    top = [e for e in events if e.cpu_parent is None and e.device_type.name == "CPU"]
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    return dict(wall=wall, ops=Counter(e.name for e in top),
                op_us=Counter({name: sum(e.cpu_time_total for e in top if e.name == name)
                               for name in {e.name for e in top}}),
                kernels=len(kernels), kernel_us=sum(e.device_time for e in kernels))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--loop", choices=list(LOOPS), default="eager")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--tiny", action="store_true", help="the tiny model of bench_generate --tiny")
    parser.add_argument("--rows", type=int, default=30, help="top-level ops listed")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build_model("ramnet", args.device, dtype, args.tiny, 0, args.prompt + args.new_tokens)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt),
                        generator=torch.Generator().manual_seed(0)).to(args.device)
    kwargs = generate_kwargs("ramnet", LOOPS[args.loop])
    with torch.no_grad():  # warm-up: compiles the kernels, captures the graph where the loop has one
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                       min_new_tokens=args.new_tokens, **kwargs)
    long = profiled_call(model, ids, args.new_tokens, kwargs, args.device)
    short = profiled_call(model, ids, 1, kwargs, args.device)
    steps = args.new_tokens - 1

    def per_step(a, b):
        return (a - b) / steps

    print(f"RAM-Net {'tiny' if args.tiny else 'small'} ({model.config.num_hidden_layers} layers), {args.device}, "
          f"loop {args.loop}, B={args.batch}, prompt {args.prompt}; per decoding step (from {steps} steps):")
    print(f"  host wall {per_step(long['wall'], short['wall']) * 1e3:.3f} ms (under the profiler), "
          f"kernels {per_step(long['kernels'], short['kernels']):.1f}, "
          f"GPU busy {per_step(long['kernel_us'], short['kernel_us']) / 1e3:.4f} ms")
    counts = {name: per_step(long["ops"][name], short["ops"].get(name, 0)) for name in long["ops"]}
    times = {name: per_step(long["op_us"][name], short["op_us"].get(name, 0)) for name in long["op_us"]}
    print(f"  top-level ops: {sum(counts.values()):.1f}; by host time (us per step), count per step:")
    for name in sorted(times, key=lambda n: -times[n])[:args.rows]:
        print(f"    {times[name]:9.1f} us  {counts[name]:6.1f}  {name}")


if __name__ == "__main__":
    main()
