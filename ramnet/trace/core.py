"""``trace_model``: record a trace, summarise its locality and write the outputs of ``ramnet trace``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..files import write_text_atomic
from .analysis import cache_sizes, reuse_histogram, stack_distances, access_stream, summarize_head
from .record import LayerTrace, record_trace

DEFAULT_BUDGETS = (0.05, 0.10, 0.25, 0.50)


def parse_indices(text: str | None, name: str) -> list[int] | None:
    """``"all"``/None: None; ``"0,2,3"``: ``[0, 2, 3]`` (a ValueError naming ``name`` otherwise)."""
    if text is None or text == "all":
        return None
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{name} must be 'all' or comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise ValueError(f"{name} must be 'all' or comma-separated integers >= 0, got {text!r}")
    return values


def summarize(traces: list[LayerTrace], heads: list[int], budgets: list[float],
              policies: tuple[str, ...] = ("lru", "lfu", "belady")) -> dict:
    """Locality of every traced (layer, head), averaged over the batch's sequences, and the mean over
    all of them; plus the power-of-two histogram of reuse distances of each (layer, head)."""
    first = traces[0]
    per_head = []
    for trace in traces:
        for h in heads:
            seqs = [summarize_head(trace.write_idx[b, :, h], trace.read_idx[b, :, h], trace.memory_slots, budgets,
                                   policies, cape=bool(trace.cape[h])) for b in range(trace.write_idx.shape[0])]
            distances = np.concatenate([stack_distances(access_stream(trace.write_idx[b, :, h],
                                                                      trace.read_idx[b, :, h])[0])
                                        for b in range(trace.write_idx.shape[0])])

            def mean(key, sub=None):
                values = [s[key] if sub is None else s[key][sub] for s in seqs]
                values = [v for v in values if v is not None]
                return float(np.mean(values)) if values else None

            per_head.append(dict(
                layer=trace.layer, head=h, cape=bool(trace.cape[h]),
                accesses=mean("accesses"), distinct_slots=mean("distinct_slots"),
                touched_fraction=mean("touched_fraction"), cold_fraction=mean("cold_fraction"),
                reuse_p50=mean("reuse_distance", "median"), reuse_p90=mean("reuse_distance", "p90"),
                reuse_mean=mean("reuse_distance", "mean"),
                reuse_histogram=reuse_histogram(distances, trace.memory_slots),
                hit_rate={p: np.mean([s["hit_rate"][p] for s in seqs], axis=0).tolist() for p in policies},
                prefetch=np.mean([s["prefetch"] for s in seqs], axis=0).tolist(),
                lru_prefetch=[_mean_dicts([s["lru_prefetch"][i] for s in seqs]) for i in range(len(budgets))],
            ))
    mean_hit = {p: np.mean([e["hit_rate"][p] for e in per_head], axis=0).tolist() for p in policies}
    mean_prefetch = np.mean([e["prefetch"] for e in per_head], axis=0).tolist()
    mean_lru_prefetch = [_mean_dicts([e["lru_prefetch"][i] for e in per_head]) for i in range(len(budgets))]
    return dict(
        memory_slots=first.memory_slots, topk=first.topk, tokens=first.num_tokens,
        sequences=int(first.write_idx.shape[0]), layers=[t.layer for t in traces], heads=heads,
        budgets=list(budgets), cache_slots=cache_sizes(first.memory_slots, list(budgets)),
        per_head=per_head, mean_hit_rate=mean_hit, mean_prefetch=mean_prefetch, mean_lru_prefetch=mean_lru_prefetch,
    )


def _mean_dicts(entries: list[dict]) -> dict:
    """The key-wise mean of dicts of numbers (None entries left out; None where all are)."""
    out = {}
    for key in entries[0]:
        values = [e[key] for e in entries if e[key] is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def trace_model(model, input_ids: torch.Tensor, out_dir: Path | None, *, layers: list[int] | None = None,
                heads: list[int] | None = None, budgets=DEFAULT_BUDGETS, chunk_size: int | None = None,
                include_slots: bool = True, plot: bool = True, meta: dict | None = None,
                policies: tuple[str, ...] = ("lru", "lfu", "belady")) -> dict:
    """Record the slots of ``input_ids [B, T]`` read by ``model`` (a RAM-Net model), summarise them and,
    with ``out_dir``, write ``trace.json`` (meta, summary and, with ``include_slots``, the slots and
    weights of every token) and ``trace.png`` (``plot``; needs matplotlib). Returns the JSON's dict, with
    ``files`` (the paths written) and ``seconds``."""
    budgets = [float(f) for f in budgets]
    if not budgets or any(not 0 < f <= 1 for f in budgets):
        raise ValueError(f"the budgets must be fractions of M in (0, 1], got {budgets}")
    start = time.perf_counter()
    traces = record_trace(model, input_ids, layers, chunk_size)
    num_heads = traces[0].num_heads
    heads = list(range(num_heads)) if heads is None else list(heads)
    bad = [h for h in heads if h >= num_heads]
    if bad:
        raise ValueError(f"heads {bad} out of range: the model has {num_heads} heads per layer")
    summary = summarize(traces, heads, budgets, policies)
    result = dict(meta=dict(meta or {}), summary=summary)
    if include_slots:
        result["traces"] = [dict(layer=t.layer, memory_slots=t.memory_slots, topk=t.topk, cape=list(t.cape),
                                 heads=heads,
                                 write_idx=t.write_idx[:, :, heads].tolist(), read_idx=t.read_idx[:, :, heads].tolist(),
                                 write_w=np.round(t.write_w[:, :, heads], 5).tolist(),
                                 read_w=np.round(t.read_w[:, :, heads], 5).tolist())
                            for t in traces]
    files = []
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if plot:
            from .report import plot_traces

            title = f"{meta.get('model', '') if meta else ''}: {summary['tokens']} tokens, reads green, writes red"
            files.append(str(plot_traces(traces, heads, out_dir / "trace.png", title=title)))
        path = out_dir / "trace.json"
        files.append(str(path))
        result["seconds"] = time.perf_counter() - start
        write_text_atomic(path, json.dumps(result) + "\n")
    result["seconds"] = time.perf_counter() - start
    result["files"] = files
    result["layer_traces"] = traces
    return result


__all__ = ["DEFAULT_BUDGETS", "parse_indices", "summarize", "trace_model"]
