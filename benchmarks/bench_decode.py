"""Decoding: one token through one layer at hidden 1024, bf16 activations, RAM-Net against Gated
DeltaNet (fla's fused recurrent step) and SDPA over a KV cache, side by side in one process.

Batch B in {1, 16, 64, 256}, context length L in {1024, 32768, 1048576}. Medians of
``triton.testing.do_bench`` (CUDA; it flushes L2 between runs) or of a plain timer (CPU).

Contenders (their state is filled with random content first; each step updates it in place):
  ram_op             ``ram_decode_step``: address decode + the Triton PDMA step kernel, the paper's
                     layer shape (H 16, d_v 64, U 5, d_p 4 so d_k 20, M 1024, K 8); state S [B, 16,
                     1024, 64] fp32 + z. Its size does not depend on L: it runs at every L with
                     offset = L (CAPE positions) to show that. On a CPU without TRITON_INTERPRET=1
                     the torch step (``decode_tokens`` + ``pdma_step``) stands in.
  ram_op_graph       the same step captured in a CUDA graph, replayed.
  ram_op_tdec(_graph) ``ram_decode_step(..., triton_decode=True)``: one kernel decodes the
                     addresses and runs the step (plus ``offset += 1``).
  ram_op_validated   ``ram_attention(..., inplace_state=True)``: the validated torch path.
  ram_layer_cache    ``RAMAttention.forward`` on a one-token input with its ``RAMNetCache``
                     (projections, validated torch op, o_proj).
  ram_layer          projections + ``ram_decode_step`` + o_proj with the same weights.
  ram_layer_graph    the previous one captured in a CUDA graph.
  ram_layer_tdec(_graph) the same two with the step that decodes its own addresses.
  gdn_h16_k128       fla ``fused_recurrent_gated_delta_rule``, H 16, d_k = d_v = 128, one token,
                     state [B, H, d_k, d_v] fp32 passed as initial_state, final state returned.
  gdn_h3_k256_v512   the same at the Gated DeltaNet paper's layer shape (H 3, d_k 256, d_v 512).
  gdn_*_graph        each of the two captured in a CUDA graph, replayed (like for like with ram_*_graph).
  sdpa_kv            ``scaled_dot_product_attention`` of q [B, 16, 1, 64] over a bf16 K/V cache
                     [B, 16, L, 64] (after writing the new key and value into its last position);
                     "does not fit" where the cache would take over 60% of free GPU memory.

Bytes per step (the GB/s columns): RAM-Net 3K rows of d_v+1 fp32 per head (K read and written
back, K read); Gated DeltaNet its state read and the final state written; SDPA the K and V cache.

    python benchmarks/bench_decode.py --out benchmarks/results/decode.json
    python benchmarks/bench_decode.py --quick
    TRITON_INTERPRET=1 python benchmarks/bench_decode.py --device cpu   # smoke test, tiny sizes
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import statistics
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from ramnet.files import write_text_atomic
from ramnet.layers.ram_attention import RAMAttention
from ramnet.models.cache import RAMNetCache
from ramnet.ops import RAMState, ram_attention
from ramnet.ops.ram import pdma_step
from ramnet.ops.ram.common import decode_tokens
from ramnet.ops.ram.step import decode_spec, ram_decode_step
from ramnet.ops.triton_support import triton_runs_on
from ramnet.provenance import environment

HIDDEN = 1024
HEADS, D_V, U, D_P, TOPK = 16, 64, 5, 4, 8
D_K, SLOTS = U * D_P, D_P**U
CAPE = [h % 2 == 0 for h in range(HEADS)]  # CAPE on half the heads (it costs the same either way)
GDN_SHAPES = {"gdn_h16_k128": (16, 128, 128), "gdn_h3_k256_v512": (3, 256, 512)}
SDPA_HEADS, SDPA_DIM = 16, 64
ACT = torch.bfloat16

SIZES = {
    "full": ([1, 16, 64, 256], [1024, 32768, 1048576]),
    "quick": ([1, 64], [1024, 32768]),
    "cpu": ([1, 2], [64, 1024]),
}
COLUMNS = ["ram_op", "ram_op_graph", "ram_op_tdec", "ram_op_tdec_graph", "ram_op_validated", "ram_layer_cache",
           "ram_layer", "ram_layer_graph", "ram_layer_tdec", "ram_layer_tdec_graph", *GDN_SHAPES,
           *(f"{name}_graph" for name in GDN_SHAPES), "sdpa_kv"]


class Skip(Exception):
    """A case that is not run (recorded with its reason, not as an error)."""


def make_timer(device: str, repeats: int):
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def timer(fn):
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return timer


def capture(fn):
    """``fn`` captured in a CUDA graph (after a warm-up on a side stream); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


# --- RAM-Net ---------------------------------------------------------------------------------------

def ram_state(batch: int, context: int, device: str) -> RAMState:
    """A state as if ``context`` tokens had been written: random S, positive z, offset = L."""
    return RAMState(
        torch.randn(batch, HEADS, SLOTS, D_V, device=device),
        torch.rand(batch, HEADS, SLOTS, device=device) + 0.5,
        torch.full((batch,), context, dtype=torch.long, device=device),
    )


def ram_bytes(batch: int) -> int:
    return batch * HEADS * 3 * TOPK * (D_V + 1) * 4


def ram_inputs(batch: int, device: str):
    q, k = (torch.randn(batch, HEADS, D_K, device=device, dtype=ACT) for _ in range(2))
    v = torch.randn(batch, HEADS, D_V, device=device, dtype=ACT)
    return q, k, v


def the_spec(device: str):
    return decode_spec(HEADS, D_K, num_partitions=U, topk=TOPK, cape=CAPE, device=device)


@torch.no_grad()
def torch_decode_step(q, k, v, state: RAMState, spec) -> torch.Tensor:
    """``ram_decode_step`` with the torch step in place of the kernel (where Triton cannot run)."""
    write_idx, write_w, decay, read_idx, read_w = decode_tokens(
        q[:, None].float(), k[:, None].float(), spec, state.offset[:, None]
    )
    _, _, o = pdma_step(state.S, state.z, write_idx[:, 0], write_w[:, 0], decay[:, 0], v.float(),
                        read_idx[:, 0], read_w[:, 0], spec.eps, inplace=True)
    state.offset.add_(1)
    return o.to(v.dtype)


def op_step(device: str, tdec: bool = False):
    """The decoding step and its description; ``tdec``: the step kernel that decodes its own addresses."""
    if triton_runs_on(device):
        where = " (interpreter)" if device == "cpu" else ""
        if tdec:
            return partial(ram_decode_step, triton_decode=True), f"Triton step with its address decoder fused in{where}"
        return partial(ram_decode_step, triton_decode=False), f"torch address decoder + Triton step{where}"
    if tdec:
        raise Skip("Triton cannot run here")
    return torch_decode_step, "torch address decoder + torch pdma_step (Triton cannot run here)"


def case_ram_op(batch, context, device, graph=False, tdec=False):
    step, impl = op_step(device, tdec)
    state, spec, (q, k, v) = ram_state(batch, context, device), the_spec(device), ram_inputs(batch, device)
    fn = lambda: step(q, k, v, state, spec)  # noqa: E731
    return (capture(fn) if graph else fn), ram_bytes(batch), impl + (" + CUDA graph" if graph else "")


def case_ram_op_validated(batch, context, device):
    state, (q, k, v) = ram_state(batch, context, device), ram_inputs(batch, device)
    q, k, v = q[:, None], k[:, None], v[:, None]
    cape = torch.tensor(CAPE, device=device)

    def fn():
        with torch.no_grad():
            return ram_attention(q, k, v, num_partitions=U, topk=TOPK, cape=cape, initial_state=state,
                                 inplace_state=True)

    return fn, ram_bytes(batch), "ram_attention(inplace_state=True), torch recurrent path"


def ram_layer(device: str) -> RAMAttention:
    torch.manual_seed(0)
    return RAMAttention(HIDDEN, HEADS, D_V, U, D_P, TOPK, cape=CAPE, layer_idx=0).to(device, ACT).eval()


def case_ram_layer_cache(batch, context, device):
    layer = ram_layer(device)
    cache = RAMNetCache()
    cache.update_state(0, ram_state(batch, context, device), num_new_tokens=context)
    x = torch.randn(batch, 1, HIDDEN, device=device, dtype=ACT)

    def fn():
        with torch.no_grad():
            return layer(x, past_key_values=cache, use_cache=True)[0]

    return fn, ram_bytes(batch), "RAMAttention.forward with RAMNetCache"


def case_ram_layer(batch, context, device, graph=False, tdec=False):
    step, impl = op_step(device, tdec)
    layer, spec, state = ram_layer(device), the_spec(device), ram_state(batch, context, device)
    x = torch.randn(batch, 1, HIDDEN, device=device, dtype=ACT)

    def fn():
        with torch.no_grad():
            q, k, v, _ = layer.project(x)
            o = step(q[:, 0], k[:, 0], v[:, 0], state, spec)
            return layer.o_proj(o.reshape(batch, 1, HEADS * D_V))

    return (capture(fn) if graph else fn), ram_bytes(batch), f"projections + ({impl}) + o_proj" + (
        " + CUDA graph" if graph else "")


# --- Gated DeltaNet (fla) ---------------------------------------------------------------------------

def case_gdn(batch, context, device, heads, d_k, d_v, graph=False):
    try:
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as kernel
    except ImportError as err:
        raise Skip(f"fla not installed ({err})") from err
    params = inspect.signature(kernel).parameters
    q = torch.randn(batch, 1, heads, d_k, device=device, dtype=ACT)
    k = F.normalize(torch.randn(batch, 1, heads, d_k, device=device), dim=-1).to(ACT)
    v = torch.randn(batch, 1, heads, d_v, device=device, dtype=ACT)
    g = F.logsigmoid(torch.randn(batch, 1, heads, device=device))
    beta = torch.rand(batch, 1, heads, device=device).sigmoid().to(ACT)
    h0 = torch.randn(batch, heads, d_k, d_v, device=device) * 0.1
    kwargs = dict(q=q, k=k, v=v, g=g, beta=beta, scale=d_k**-0.5, initial_state=h0, output_final_state=True)
    if "use_qk_l2norm_in_kernel" in params:
        kwargs["use_qk_l2norm_in_kernel"] = False
    if "head_first" in params:
        kwargs["head_first"] = False
    missing = [name for name in kwargs if name not in params]
    if missing and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        raise RuntimeError(f"fused_recurrent_gated_delta_rule{inspect.signature(kernel)} lacks {missing}")

    def fn():
        with torch.no_grad():
            return kernel(**kwargs)

    impl = f"fla fused_recurrent_gated_delta_rule H{heads} d_k{d_k} d_v{d_v}" + (" + CUDA graph" if graph else "")
    return (capture(fn) if graph else fn), 2 * batch * heads * d_k * d_v * 4, impl


# --- SDPA with a KV cache ---------------------------------------------------------------------------

def case_sdpa(batch, context, device):
    cache_bytes = 2 * batch * SDPA_HEADS * context * SDPA_DIM * torch.finfo(ACT).bits // 8
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        if cache_bytes > 0.6 * free:
            raise Skip(f"does not fit: KV cache {cache_bytes / 2**30:.1f} GiB > 60% of free {free / 2**30:.1f} GiB")
    k_cache, v_cache = (torch.empty(batch, SDPA_HEADS, context, SDPA_DIM, device=device, dtype=ACT).normal_()
                        for _ in range(2))
    q, k_new, v_new = (torch.randn(batch, SDPA_HEADS, 1, SDPA_DIM, device=device, dtype=ACT) for _ in range(3))

    def fn():
        k_cache[:, :, -1:].copy_(k_new)
        v_cache[:, :, -1:].copy_(v_new)
        return F.scaled_dot_product_attention(q, k_cache, v_cache)

    return fn, cache_bytes, "torch SDPA, q len 1 over a bf16 KV cache"


def cases(device: str):
    """``(name, build(batch, context) -> (fn, bytes, impl))`` for every contender on ``device``."""
    cuda, tdec = device == "cuda", triton_runs_on(device)
    builds = {
        "ram_op": lambda b, n: case_ram_op(b, n, device),
        "ram_op_graph": cuda and (lambda b, n: case_ram_op(b, n, device, graph=True)),
        "ram_op_tdec": tdec and (lambda b, n: case_ram_op(b, n, device, tdec=True)),
        "ram_op_tdec_graph": cuda and tdec and (lambda b, n: case_ram_op(b, n, device, graph=True, tdec=True)),
        "ram_op_validated": lambda b, n: case_ram_op_validated(b, n, device),
        "ram_layer_cache": lambda b, n: case_ram_layer_cache(b, n, device),
        "ram_layer": lambda b, n: case_ram_layer(b, n, device),
        "ram_layer_graph": cuda and (lambda b, n: case_ram_layer(b, n, device, graph=True)),
        "ram_layer_tdec": tdec and (lambda b, n: case_ram_layer(b, n, device, tdec=True)),
        "ram_layer_tdec_graph": cuda and tdec and (lambda b, n: case_ram_layer(b, n, device, graph=True, tdec=True)),
        **{name: cuda and (lambda b, n, s=shape: case_gdn(b, n, device, *s)) for name, shape in GDN_SHAPES.items()},
        # Like for like with ram_*_graph: GDN's step in a CUDA graph too (its warm-up call autotunes first).
        **{f"{name}_graph": cuda and (lambda b, n, s=shape: case_gdn(b, n, device, *s, graph=True))
           for name, shape in GDN_SHAPES.items()},
        "sdpa_kv": lambda b, n: case_sdpa(b, n, device),
    }
    return [(name, build) for name, build in builds.items() if build]


def run_case(name, build, batch, context, timer, device) -> dict:
    row = {"contender": name, "B": batch, "L": context, "ms": None, "bytes": None, "GBps": None}
    try:
        fn, nbytes, impl = build(batch, context)
        row["impl"], row["bytes"] = impl, nbytes
        ms = timer(fn)
        row["ms"] = ms
        row["GBps"] = nbytes / (ms * 1e-3) / 1e9 if ms > 0 else None
    except Skip as why:
        row["skipped"] = str(why)
    except Exception as err:  # noqa: BLE001 - every failure is a result to record
        row["error"] = f"{type(err).__name__}: {err}"[:500]
        row["traceback"] = traceback.format_exc(limit=4)[-2000:]
    finally:
        fn = None  # noqa: F841 - drop the state, caches and graphs before the next case
        gc.collect()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    return row


def cell(row: dict | None, key: str) -> str:
    if row is None:
        return ""
    if row.get("skipped"):
        return "does not fit" if row["skipped"].startswith("does not fit") else "skipped"
    if row.get("error"):
        return "error"
    value = row[key]
    if value is None:
        return "n/a"
    return f"{value:.4g}" if key == "ms" else f"{value:.3g}"


def markdown(meta: dict, rows: list[dict]) -> str:
    names = [c for c in COLUMNS if any(r["contender"] == c for r in rows)]
    sizes = sorted({(r["B"], r["L"]) for r in rows})
    find = {(r["contender"], r["B"], r["L"]): r for r in rows}
    lines = [
        f"Decode step, one layer, hidden {HIDDEN}, bf16 activations. {meta['device']}; torch {meta['torch']}, "
        f"triton {meta['triton']}, fla {meta['fla']}. Timer: {meta['timer']}.",
        "",
        "Median time per step (ms):",
        "",
        "| B | L | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    lines += [f"| {b} | {n} | " + " | ".join(cell(find.get((c, b, n)), "ms") for c in names) + " |" for b, n in sizes]
    lines += ["", "Bytes touched per step / median time (GB/s):", "",
              "| B | L | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    lines += [f"| {b} | {n} | " + " | ".join(cell(find.get((c, b, n)), "GBps") for c in names) + " |" for b, n in sizes]
    per_b = sorted({(r["B"], r["bytes"]) for r in rows if r["contender"] == "ram_op" and r["bytes"]})
    if per_b:
        lines += ["", "RAM-Net bytes per step (3K rows of d_v+1 fp32 per head): "
                  + ", ".join(f"B={b}: {nbytes / 2**20:.2f} MiB" for b, nbytes in per_b)]
    problems = [r for r in rows if r.get("error") or r.get("skipped")]
    if problems:
        lines += ["", "Not run or failed:", ""]
        lines += [f"- {r['contender']} B={r['B']} L={r['L']}: {r.get('error') or r.get('skipped')}" for r in problems]
    impls = {r["contender"]: r["impl"] for r in rows if r.get("impl")}
    if impls:
        lines += ["", "Contenders:", ""] + [f"- {c}: {impls[c]}" for c in names if c in impls]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode.json")
    parser.add_argument("--quick", action="store_true", help="a small subset of the sizes")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case on the CPU")
    parser.add_argument("--batch", type=int, nargs="+", help="override the batch sizes")
    parser.add_argument("--context", type=int, nargs="+", help="override the context lengths")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU (use --device cpu for a smoke test)")
    batches, contexts = SIZES["cpu" if args.device == "cpu" else "quick" if args.quick else "full"]
    batches, contexts = args.batch or batches, args.context or contexts

    meta = {
        **environment(args.device),
        "triton_kernels": triton_runs_on(args.device),
        "timer": "triton.testing.do_bench median" if args.device == "cuda"
        else f"perf_counter median of {args.repeats}",
        "shape": dict(hidden=HIDDEN, activations="bf16", ram=dict(H=HEADS, d_v=D_V, U=U, d_p=D_P, d_k=D_K, M=SLOTS,
                      K=TOPK, cape_heads=sum(CAPE)), gdn={k: dict(H=h, d_k=dk, d_v=dv) for k, (h, dk, dv)
                      in GDN_SHAPES.items()}, sdpa=dict(H=SDPA_HEADS, head_dim=SDPA_DIM)),
        "batches": batches,
        "contexts": contexts,
        "argv": sys.argv[1:],
    }
    timer = make_timer(args.device, args.repeats)
    rows = []
    contenders = cases(args.device)
    broken = {}  # graph contenders whose capture failed: a failed capture can leave CUDA unusable
    for batch in batches:
        for context in contexts:
            for name, build in contenders:
                if name in broken:
                    rows.append({"contender": name, "B": batch, "L": context, "ms": None, "bytes": None,
                                 "GBps": None, "skipped": f"not run: failed at an earlier size ({broken[name]})"})
                    continue
                row = run_case(name, build, batch, context, timer, args.device)
                if name.endswith("_graph") and row.get("error") and "out of memory" not in row["error"]:
                    broken[name] = row["error"][:120]
                rows.append(row)
                status = f"{row['ms']:.4f} ms" if row["ms"] is not None else row.get("skipped") or row.get("error")
                print(f"B={batch:<4} L={context:<8} {name:<18} {status}", file=sys.stderr, flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    table = markdown(meta, rows)
    write_text_atomic(args.out.with_suffix(".md"), table)
    print("\n" + table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
