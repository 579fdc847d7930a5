"""How sharp a trained RAM-Net's addresses are: per layer and head, the learned temperatures e^alpha
and what the decoder makes of held-out text (the weight of the top slot, the mass of the K kept
slots, for the write addresses of k and the read addresses of q) and how many distinct slots a
sequence writes. A flat product softmax spreads every write over K slots with small weights, so a
slot holds a long, blurred average and a read gets little mass; sharp addresses overwrite and read
one slot.

    python benchmarks/lm_address_stats.py runs/lm_study/ramnet --data data/python-packages-bpe8k --out STEM

writes STEM.json (one row per layer and head, and the means per layer) and STEM.md. The model
directory may be a run directory (its `latest` checkpoint) or a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ramnet.files import write_text_atomic
from ramnet.layers import RAMAttention
from ramnet.lm.data import TokenData, Windows
from ramnet.lm.evaluate import load, model_directory
from ramnet.ops.address import address_decode
from ramnet.provenance import environment

STATS = ("write_top1", "write_mass", "read_top1", "read_mass", "slots_written")


def address_stats(model, input_ids: torch.Tensor) -> list[dict]:
    """One dict per (RAM-Net layer, head): its e^alpha of q and k and the decoder's statistics over
    ``input_ids [B, T]``, each a mean over tokens (``slots_written``: distinct slots written per
    sequence, as a fraction of M)."""
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    layers = [(i, m) for i, m in enumerate(model.modules()) if isinstance(m, RAMAttention)]
    for i, layer in layers:

        def capture(q, k, *args, _i=i, _run=layer.memory.run):
            captured[_i] = (q.detach().float(), k.detach().float())
            return _run(q, k, *args)

        layer.memory.run = capture
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for _, layer in layers:
            del layer.memory.run  # the class's method again
    rows = []
    for n, (i, layer) in enumerate(layers):
        q, k = captured[i]
        spec = layer.memory.spec(q)
        decode = dict(num_partitions=spec.num_partitions, topk=spec.topk, tau=spec.tau)
        _, read = address_decode(q, **decode)  # [B, T, H, K], sorted by decreasing weight
        slots, write = address_decode(k, **decode)
        m = layer.memory_slots
        for h in range(layer.num_heads):
            # Distinct slots written by each sequence (absolute slots: CAPE only rotates them).
            written = [torch.unique(slots[b, :, h]).numel() / m for b in range(slots.shape[0])]
            rows.append(dict(
                layer=n, head=h, cape=bool(layer.cape[h]), memory_slots=m, topk=spec.topk,
                q_scale=layer.q_log_scale[h].exp().item(), k_scale=layer.k_log_scale[h].exp().item(),
                write_top1=float(write[..., h, 0].mean()), write_mass=float(write[..., h, :].sum(-1).mean()),
                read_top1=float(read[..., h, 0].mean()), read_mass=float(read[..., h, :].sum(-1).mean()),
                slots_written=sum(written) / len(written),
            ))
    return rows


def per_layer(rows: list[dict]) -> list[dict]:
    layers = sorted({r["layer"] for r in rows})
    out = []
    for n in layers:
        mine = [r for r in rows if r["layer"] == n]
        mean = {key: sum(r[key] for r in mine) / len(mine) for key in ("q_scale", "k_scale", *STATS)}
        out.append(dict(layer=n, heads=len(mine), cape_heads=sum(r["cape"] for r in mine), **mean))
    return out


def table(layers: list[dict], title: str) -> str:
    lines = [f"# Address sharpness: {title}", "",
             "Means over heads and held-out tokens. top1: weight of the best slot; mass: sum of the K kept "
             "weights (1 = all of the product softmax); slots written: distinct slots a sequence writes, of M.", "",
             "| layer | CAPE heads | e^alpha q | e^alpha k | write top1 | write mass | read top1 | read mass | slots written |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in layers:
        lines.append(f"| {r['layer']} | {r['cape_heads']}/{r['heads']} | {r['q_scale']:.2f} | {r['k_scale']:.2f} | "
                     f"{r['write_top1']:.3f} | {r['write_mass']:.3f} | {r['read_top1']:.3f} | {r['read_mass']:.3f} | "
                     f"{r['slots_written']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a run directory or checkpoint of a RAM-Net model")
    parser.add_argument("--data", type=Path, required=True, help="prepared data directory (its val split is read)")
    parser.add_argument("--batches", type=int, default=4, help="held-out sequences read")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--out", type=Path, required=True, help="results prefix: OUT.json, OUT.md")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = model_directory(args.model)
    model, _ = load(path, device)
    ids = Windows(TokenData(args.data), "val", args.seq_len, shuffle=False).batch(range(args.batches))[:, :-1]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        rows = address_stats(model.eval(), ids.to(device))
    if not rows:
        sys.exit(f"{path} has no RAM-Net layers")
    layers = per_layer(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(environment(device), model=str(path), data=str(args.data), sequences=args.batches, seq_len=args.seq_len)
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(dict(meta=meta, layers=layers, heads=rows), indent=2) + "\n")
    text = table(layers, str(args.model))
    write_text_atomic(args.out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
