"""What bounds the on-chip PDMA kernels (``ops/pdma/onchip.py``): the forward and the backward alone, at
the op level (slots and weights drawn at random, no address decoder), against the Triton token
kernels on the same inputs, while one launch setting at a time changes (``PREFETCH``, ``WIDTH``,
``BACKWARD_PREFETCH``), and with the batch grown at a fixed length (more blocks than SMs: whether the
per-token chain or the machine is the limit). Time per token of one block's chain is printed in
cycles at the SM clock: a chain bound by the latency of its inputs' loads gains from a deeper
prefetch; one bound by its own instructions does not.

    python benchmarks/profile_onchip.py --out /tmp/onchip_profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

from ramnet.files import write_text_atomic
from ramnet.ops.pdma import onchip, token_triton
from ramnet.provenance import environment

H, D_V, M, K = 16, 64, 1024, 8


def inputs(batch: int, seq_len: int, seed: int = 0):
    """Slots distinct within a token's writes and within its reads (the decoder's top-K), weights in (0, 1]."""
    gen = torch.Generator("cuda").manual_seed(seed)
    shape = (batch, seq_len, H)
    keys = torch.rand(*shape, M, device="cuda", generator=gen)
    write_idx = keys.topk(K, dim=-1).indices
    read_idx = torch.rand(*shape, M, device="cuda", generator=gen).topk(K, dim=-1).indices
    del keys
    write_w = torch.rand(*shape, K, device="cuda", generator=gen).softmax(-1)
    read_w = torch.rand(*shape, K, device="cuda", generator=gen).softmax(-1)
    decay = 1 - write_w * torch.rand(*shape, K, device="cuda", generator=gen)
    v = torch.randn(*shape, D_V, device="cuda", generator=gen, dtype=torch.bfloat16)
    return write_idx, write_w, decay, read_idx, read_w, v


def runner(fn, args, backward: bool):
    if not backward:
        def forward():
            with torch.no_grad():
                fn(*args, memory_slots=M, eps=1e-6)
        return forward
    leaves = [x.requires_grad_() if x.is_floating_point() else x for x in args]
    o, _ = fn(*leaves, memory_slots=M, eps=1e-6)
    grad = torch.randn_like(o)

    def forward_backward():
        out, _ = fn(*leaves, memory_slots=M, eps=1e-6)
        torch.autograd.grad(out, [x for x in leaves if x.requires_grad], grad)
    return forward_backward


def measure(fn, batch: int, seq_len: int, clock_mhz: float, blocks_an_sm: bool) -> dict:
    args = inputs(batch, seq_len)
    row = {}
    for key, backward in (("fwd_ms", False), ("fwd_bwd_ms", True)):
        row[key] = triton.testing.do_bench(runner(fn, [a.clone() for a in args], backward), warmup=5, rep=40,
                                          return_mode="median")
    waves = 1  # the token kernels' one-warp programs all fit on the GPU at once at these batches
    if blocks_an_sm:  # the on-chip forward: one block a (sequence, head, slice), one an SM at M 1024
        chains = batch * H * -(-D_V // onchip.WIDTH)
        waves = -(-chains // torch.cuda.get_device_properties(0).multi_processor_count)
    row["fwd_cycles_per_token"] = row["fwd_ms"] * 1e-3 * clock_mhz * 1e6 / (seq_len * waves)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--prefetch", type=int, nargs="+", default=[1, 2, 3, 4])
    # Not torch.cuda.clock_rate: it reads the current clock, an idle 345 MHz on an H100 between launches.
    parser.add_argument("--sm-clock-mhz", type=float, default=1980.0, help="the SM clock under load (H100 SXM: 1980)")
    args = parser.parse_args()
    clock = args.sm_clock_mhz
    meta = dict(**environment("cuda"), sm_clock_mhz=clock, shape=dict(H=H, d_v=D_V, M=M, K=K, seq_len=args.seq_len))
    rows = []

    def record(label: str, fn, batch: int, **setting):
        try:
            row = dict(label=label, B=batch, **setting,
                       **measure(fn, batch, args.seq_len, clock, blocks_an_sm=label == "onchip"))
        except Exception as err:  # a setting that does not compile or does not fit
            row = dict(label=label, B=batch, **setting, error=f"{type(err).__name__}: {str(err)[:300]}")
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_text_atomic(args.out, json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")

    defaults = dict(PREFETCH=onchip.PREFETCH, WIDTH=onchip.WIDTH, BACKWARD_PREFETCH=onchip.BACKWARD_PREFETCH,
                    BACKWARD=onchip.BACKWARD)
    for batch in args.batch:
        record("token", token_triton.token_pdma_triton, batch)
        record("onchip", onchip.onchip_pdma, batch, **defaults)
    batch = args.batch[0]
    changes = [dict(PREFETCH=p) for p in args.prefetch if p != defaults["PREFETCH"]]
    changes += [dict(WIDTH=16), dict(BACKWARD_PREFETCH=1)]
    for change in changes:
        for name, value in change.items():
            setattr(onchip, name, value)
        try:
            record("onchip", onchip.onchip_pdma, batch, **{**defaults, **change})
        finally:
            for name, value in defaults.items():
                setattr(onchip, name, value)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
