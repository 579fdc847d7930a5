"""Decoding with the three RAM states (issue 18): dense on the GPU, sparse, and host-resident with a GPU
cache of hot slots at several budgets; tokens/s, the state's GPU memory against the dense state's, the
cache's hit rate, and whether the greedy tokens are the dense state's.

The model is 340M-shaped (27 layers, hidden 1024, 16 heads, d_v 64, K 8) with random weights, at
M = 1024 (U 5 x d_p 4, the paper's) and M = 65,536 (U 8 x d_p 4). A context of L tokens is stood for by a
state filled with random content (min(M, L * K) rows per head, the same for every state kind, seeded) at
offset L, so that contexts up to 1M tokens need no 1M-token prefill; then W warm-up steps (the cache
fills; not timed, not counted in the hit rate) and N timed greedy steps through ``model(...)`` with the
``RAMNetCache``. The dense rows are the reference for ``tokens_match``; a row that runs eagerly under
``--graph`` (the sparse state's) is compared with the dense state's eager tokens (a captured step and an eager
one may differ in the last bits, e.g. by cuBLAS's choice of kernels, and a greedy decode then drifts).

    python benchmarks/bench_offload.py --out benchmarks/results/offload.json        # one H200
    python benchmarks/bench_offload.py --smoke --out /tmp/offload.json              # CPU, tiny, seconds
    python benchmarks/bench_offload.py --graph --out benchmarks/results/offload_graph.json   # steps in a CUDA graph

``--graph`` times replays of one captured decoding step instead of eager steps, for the dense and the
host-resident state alike: what the launches of a step cost is then the GPU's, not the host's, in both.
The sparse state reads its key count on the host and cannot be captured: its rows run eagerly (``mode``
says which).

The file (and a markdown table beside it, ``.md``) is rewritten after every row, so a run cut short keeps
what it measured; ``--resume`` keeps the rows of an earlier run of the same device and settings and runs
only the cases it lacks.

Rows: ``{state, budget, B, context, M, tok_s, gpu_state_fraction, hit_rate, ...}`` (budget None and
hit_rate None where they do not apply; ``gpu_state_bytes``, ``tokens_match``, ``steps``; ``skipped``
with a reason where a case does not fit). ``meta``: device, versions and the measured commit as
``git_rev`` (``ramnet.provenance.environment``).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from ramnet.files import write_text_atomic
from ramnet.models import RAMNetCache, RAMNetConfig, RAMNetForCausalLM
from ramnet.models.ramnet.modeling_ramnet import CACHE_FIELD
from ramnet.ops import RAMState
from ramnet.provenance import environment
from ramnet.states import OffloadState, SparseState, dense_state_fraction
from ramnet.states.offload import DEFAULT_POLICY, POLICIES

SHAPE_340M = dict(hidden_size=1024, num_hidden_layers=27, num_heads=16, head_v_dim=64, topk=8, intermediate_size=2816,
                  vocab_size=32000)
GEOMETRIES = {1024: dict(num_partitions=5, partition_dim=4), 65536: dict(num_partitions=8, partition_dim=4)}
SMOKE_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_heads=2, head_v_dim=16, topk=4, intermediate_size=128,
                   vocab_size=256)
SMOKE_GEOMETRIES = {64: dict(num_partitions=3, partition_dim=4), 256: dict(num_partitions=4, partition_dim=4)}


def build_model(shape: dict, geometry: dict, device: str, dtype: torch.dtype) -> RAMNetForCausalLM:
    torch.manual_seed(0)
    config = RAMNetConfig(**shape, **geometry, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    with torch.device(device):
        model = RAMNetForCausalLM(config)
    return model.to(dtype).eval()


def filled_state(batch: int, heads: int, memory_slots: int, d_v: int, topk: int, context: int, layer: int,
                 device: str) -> RAMState:
    """A state as after ``context`` tokens: min(M, L * K) random rows per (sequence, head) (the same slots
    for every head), the rest empty; seeded by the layer, so every state kind starts from the same one.
    Drawn on ``device`` (at M = 65,536 a layer's rows are 67M numbers a sequence)."""
    g = torch.Generator(device=device).manual_seed(1000 + layer)
    state = RAMState.empty(batch, heads, memory_slots, d_v, dtype=torch.float32, device=device)
    touched = min(memory_slots, context * topk)
    slots = torch.randperm(memory_slots, generator=g, device=device)[:touched]
    state.S[:, :, slots] = 0.1 * torch.randn(batch, heads, touched, d_v, generator=g, device=device)
    state.z[:, :, slots] = 0.5 + torch.rand(batch, heads, touched, generator=g, device=device)
    state.offset.fill_(context)
    return state


def make_cache(model, kind: str, budget: float | None, policy: str, batch: int, context: int, device: str,
               host_device: str = "cpu"):
    """The layers' states at ``context`` tokens; the host-resident state's host table on ``host_device`` (the
    CPU; "cuda" puts it in device memory: the cache's cost without the bus, a diagnostic)."""
    config = model.config
    options = {} if kind != "offload" else dict(budget=budget, policy=policy, host_device=host_device)
    cache = RAMNetCache(ram_state=kind, **options)
    M = config.partition_dim ** config.num_partitions
    for layer in range(config.num_hidden_layers):
        dense = filled_state(batch, config.num_heads, M, config.head_v_dim, config.topk, context, layer, device)
        if kind == "dense":
            state = dense
        else:
            state = SparseState() if kind == "sparse" else OffloadState(**options)
            state.load_dense(dense)
            del dense
        cache.update_state(layer, state, num_new_tokens=context)
    return cache


def state_device_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        state = layer.state
        if isinstance(state, RAMState):
            total += sum(t.numel() * t.element_size() for t in state)
        else:
            total += state.device_bytes() + state.offset.numel() * 8
    return total


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_stats(cache) -> None:
    """The caches' counters to zero (in place: a captured step keeps adding to them)."""
    for layer in cache.layers:
        if isinstance(layer.state, OffloadState):
            layer.state.stats = dict.fromkeys(layer.state.stats, 0)


@torch.no_grad()
def decode(model, cache, batch: int, warmup: int, steps: int, device: str, graph: bool = False):
    """Greedy steps from token 1: ``(tokens [B, steps], seconds of the timed steps)``. ``graph``: the timed
    steps are replays of one step captured in a CUDA graph (after the warm-up and the capture's own two
    warm-up steps, which decode too)."""
    token = torch.ones(batch, 1, dtype=torch.long, device=device)
    tokens = []

    def one(token):
        logits = model(input_ids=token, **{CACHE_FIELD: cache}, use_cache=True).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    for _ in range(warmup):
        token = one(token)
    if graph:
        return graph_decode(one, token, cache, steps)
    reset_stats(cache)  # the hit rate of the timed steps only
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        token = one(token)
        tokens.append(token)
    sync(device)
    return torch.cat(tokens, dim=1).cpu(), time.perf_counter() - start


# Eager steps on a side stream before a capture (torch's recipe: allocations and lazy initialisations happen
# outside the graph).
CAPTURE_WARMUP = 2


def graph_decode(one, token: torch.Tensor, cache, steps: int):
    """``decode``'s timed steps as replays of one captured step: the token fed back through a fixed buffer,
    each step's token written at a device counter. Both the dense and the host-resident state step in
    place with nothing read on the host; the sparse state reads its key count and cannot be captured."""
    ids = token.clone()
    out = torch.zeros(token.shape[0], steps + CAPTURE_WARMUP, dtype=torch.long, device=token.device)
    at = torch.zeros(1, dtype=torch.long, device=token.device)

    def step():
        nxt = one(ids)
        ids.copy_(nxt)
        out.index_copy_(1, at, nxt)
        at.add_(1)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(CAPTURE_WARMUP):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records the step, runs nothing
        step()
    reset_stats(cache)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    graph.reset()
    return out.cpu()[:, CAPTURE_WARMUP:], seconds


def hit_rate(cache) -> float | None:
    stores = [layer.state for layer in cache.layers if isinstance(layer.state, OffloadState)]
    if not stores:
        return None
    hits = sum(s.stats["hits"] for s in stores)
    return hits / max(1, sum(s.stats["accesses"] for s in stores))


def dense_bytes(model, batch: int) -> int:
    c = model.config
    M = c.partition_dim ** c.num_partitions
    return c.num_hidden_layers * (batch * c.num_heads * M * (c.head_v_dim + 1) * 4 + batch * 8)


def fits(model, batch: int, kind: str, device: str, host_limit: float) -> str | None:
    """Why a case cannot run here (None: it can): the dense state on the GPU, the offloaded one on the host."""
    need = dense_bytes(model, batch)
    if kind in ("dense", "sparse") and device == "cuda":
        free = torch.cuda.mem_get_info()[0]
        if need > 0.8 * free:
            return f"the dense state ({need / 2**30:.1f} GiB) does not fit in 80% of the free GPU memory"
    if kind == "offload":
        import os

        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if need > host_limit * host:
            return f"the host state ({need / 2**30:.1f} GiB) exceeds {host_limit:.0%} of host memory"
    return None


CASE_KEYS = ("state", "budget", "B", "context", "M")


def case_key(row: dict) -> tuple:
    return tuple(row[key] for key in CASE_KEYS)


def markdown(meta: dict, rows: list[dict]) -> str:
    """The rows as a table, with the run's device, versions and commit."""
    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    lines = [f"Decoding with the three RAM states: {meta.get('device')}; torch {meta.get('torch')}, triton "
             f"{meta.get('triton')}; commit {meta.get('git_rev')}; {meta.get('dtype')}; {meta.get('warmup')} warm-up "
             f"and {meta.get('steps')} timed steps ({meta.get('mode', 'eager')}); policy {meta.get('policy')}. "
             f"{meta.get('context_note', '')}.", "",
             "| state | budget | B | context | M | tok/s | GPU state / dense | hit rate | tokens = dense | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = r.get("skipped") or ("error" if r.get("error") else "")
        if r.get("mode", meta.get("mode")) != meta.get("mode"):
            note = f"{r['mode']} steps" + (f"; {note}" if note else "")
        match = r.get("tokens_match")
        lines.append(f"| {r['state']} | {fmt(r['budget'], '.2f')} | {r['B']} | {r['context']} | {r['M']} | "
                     f"{fmt(r['tok_s'], '.4g')} | {fmt(r['gpu_state_fraction'], '.4f')} | {fmt(r['hit_rate'], '.4f')} | "
                     f"{'' if match is None else ('yes' if match else 'no')} | {note} |")
    return "\n".join(lines) + "\n"


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    """The JSON and the markdown beside it, each written atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    write_text_atomic(out.with_suffix(".md"), markdown(meta, rows))


def earlier_rows(out: Path, meta: dict) -> list[dict]:
    """``--resume``: the rows of ``out`` (measured rows only), refusing a file of another device or settings."""
    if not out.exists():
        return []
    old = json.loads(out.read_text())
    for key in ("device", "shape", "dtype", "warmup", "steps", "policy", "smoke", "mode"):
        theirs = old["meta"].get(key, "eager" if key == "mode" else None)  # files from before --graph: eager
        if theirs != meta.get(key):
            raise SystemExit(f"--resume: {out} has {key}={theirs!r}, this run {meta.get(key)!r}")
    return [row for row in old["rows"] if row.get("tok_s") is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "offload.json")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU: checks the script in seconds")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda, or cpu with --smoke")
    parser.add_argument("--memory", type=int, nargs="+", help="M values (default 1024 65536; smoke 64 256)")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="default 1 16 (smoke 1 2)")
    parser.add_argument("--context", type=int, nargs="+", default=None,
                        help="default 1024 32768 1048576 (smoke 16 4096)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.10, 0.25])
    parser.add_argument("--policy", choices=list(POLICIES), default=DEFAULT_POLICY,
                        help=f"the cache's policy (default {DEFAULT_POLICY})")
    parser.add_argument("--states", nargs="+", default=["dense", "sparse", "offload"])
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 16; smoke 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 64; smoke 8)")
    parser.add_argument("--host-limit", type=float, default=0.6, help="largest host state, as a fraction of RAM")
    parser.add_argument("--resume", action="store_true", help="keep --out's measured rows, run only the missing cases")
    parser.add_argument("--graph", action="store_true",
                        help="time replays of one captured decoding step (CUDA; the sparse state runs eagerly)")
    args = parser.parse_args()
    if args.graph and (args.device == "cpu" or (args.smoke and args.device is None)):
        parser.error("--graph captures CUDA graphs: it needs --device cuda")
    device = args.device or ("cpu" if args.smoke else "cuda")
    shape, geometries = (SMOKE_SHAPE, SMOKE_GEOMETRIES) if args.smoke else (SHAPE_340M, GEOMETRIES)
    memories = args.memory or list(geometries)
    batches = args.batch or ([1, 2] if args.smoke else [1, 16])
    contexts = args.context or ([16, 4096] if args.smoke else [1024, 32768, 1048576])
    warmup = args.warmup if args.warmup is not None else (4 if args.smoke else 16)
    steps = args.steps if args.steps is not None else (8 if args.smoke else 64)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    meta = dict(environment(device), issue=18, shape=shape, dtype=str(dtype), warmup=warmup, steps=steps,
                policy=args.policy, smoke=args.smoke, mode="graph" if args.graph else "eager",
                context_note="a context is a random state at that offset with min(M, L*K) rows per head filled")
    rows = earlier_rows(args.out, meta) if args.resume else []
    done = {case_key(row) for row in rows}
    for M in memories:
        geometry = geometries.get(M)
        if geometry is None:
            raise SystemExit(f"--memory {M}: known values are {sorted(geometries)}")
        model = build_model(shape, geometry, device, dtype)
        for batch in batches:
            for context in contexts:
                reference = None
                cases = [(kind, None) for kind in args.states if kind != "offload"]
                if "offload" in args.states:
                    cases += [("offload", b) for b in args.budgets]
                if all((kind, budget, batch, context, M) in done for kind, budget in cases):
                    continue
                if ("dense", None, batch, context, M) in done:  # the reference tokens are not kept: run it again
                    rows = [row for row in rows if case_key(row) != ("dense", None, batch, context, M)]
                for kind, budget in cases:
                    if (kind, budget, batch, context, M) in done and kind != "dense":
                        continue
                    row = dict(state=kind, budget=budget, B=batch, context=context, M=M, tok_s=None,
                               gpu_state_fraction=None, hit_rate=None)
                    reason = fits(model, batch, kind, device, args.host_limit)
                    graph = args.graph and kind != "sparse"  # the sparse state reads its key count on the host
                    row["mode"] = "graph" if graph else "eager"
                    if reason:
                        rows.append(dict(row, skipped=reason))
                        print(json.dumps(rows[-1]), flush=True)
                        write(args.out, meta, rows)
                        continue
                    try:
                        cache = make_cache(model, kind, budget, args.policy, batch, context, device)
                        tokens, seconds = decode(model, cache, batch, warmup, steps, device, graph)
                        if kind == "dense":
                            reference = tokens
                        compare_with = reference
                        if args.graph and not graph and reference is not None:  # the dense state's eager tokens
                            dense = make_cache(model, "dense", None, args.policy, batch, context, device)
                            compare_with = decode(model, dense, batch, warmup, steps, device, False)[0]
                            row["tokens_reference"] = "dense, eager"
                            dense = None
                        gpu_bytes = state_device_bytes(cache)
                        row.update(
                            tok_s=batch * steps / seconds, gpu_state_bytes=gpu_bytes,
                            gpu_state_fraction=gpu_bytes / dense_bytes(model, batch), hit_rate=hit_rate(cache),
                            tokens_match=None if compare_with is None else bool(torch.equal(tokens, compare_with)),
                            steps=steps,
                        )
                        if kind == "offload":
                            row["cache_fraction"] = dense_state_fraction(cache.layers[0].state)
                    except torch.cuda.OutOfMemoryError as err:  # a size that does not fit: say so, go on
                        row["skipped"] = f"out of memory: {str(err).splitlines()[0]}"
                    except Exception:  # noqa: BLE001 - one failing case must not lose the others
                        row["error"] = traceback.format_exc(limit=3)
                    rows.append(row)
                    print(json.dumps(rows[-1]), flush=True)
                    write(args.out, meta, rows)
                    cache = None
                    gc.collect()
                    if device == "cuda":
                        torch.cuda.empty_cache()
        del model
    write(args.out, meta, rows)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
