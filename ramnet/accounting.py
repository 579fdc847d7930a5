"""State-size accounting of a RAM-Net model, per sequence, in floats.

What each mixer type (``RAMNetConfig.mixer_types``) keeps between tokens (``total``) and touches
for one token (``active_per_token``), with ``H = num_heads``, ``d_v = head_v_dim``, ``d_k =
num_partitions * partition_dim``, ``M = partition_dim ** num_partitions``, ``K = topk``,
``S = window_size``:

- ``"ramnet"``: M slots of d_v values plus one normaliser per head,
  ``H * M * (d_v + 1)``; a token reads K slots and writes K slots, ``H * 2K * (d_v + 1)``.
- ``"hybrid"``: its fast-weight memory plus its window of keys (d_k wide) and values (d_v wide).
  Fast weights: RAM-Net as above; DeltaNet ``H * d_k * d_v``, all of it read and rewritten by
  every token. Window: S tokens for the synchronous and delayed-stream blends, at most S - 1
  (the chunk in progress) for the delayed chunk, ``H * (d_k + d_v)`` floats per token (plus
  DeltaNet's write strength beta, ``H``); a token attends S of them (its own included),
  ``S * H * (d_k + d_v)``. Delayed blends write each pair into the fast weights when it leaves the
  window (in bulk at a chunk's end): the write is counted once per token, as the FW's 2K (or
  d_k * d_v) above.
- ``"sliding_attention"``: the S - 1 last keys and values, ``(S - 1) * H * 2 * d_v``; a token
  attends S (its own included), ``S * H * 2 * d_v``.
- ``"full_attention"``: every key and value, ``seq_len * H * 2 * d_v`` after ``seq_len`` tokens;
  the last of them attends all of them (its own included): the same count.

Attention layers read their whole window (context) per token, so their active count is the
window (context), not a K-sparse part of it. Windows are counted full, as for a sequence at least
S tokens long; ``seq_len`` only sizes the full-attention layers. Integer bookkeeping (positions,
validity flags, token counts) is not counted.
"""

from __future__ import annotations

from .ops.checks import check_int, memory_geometry


def state_size(config, seq_len: int | None = None) -> dict[str, int]:
    """State of one sequence, in floats, summed over the layers of any config with the
    `RAMNetConfig` fields (without ``mixer_types``, every layer is RAM-Net): ``total`` (what the
    cache holds) and ``active_per_token`` (what one token reads or writes), per mixer type as in
    the module docstring.

    ``seq_len``: the context length, needed (and used) only by full-attention layers, whose cache
    grows with it; a config with such layers and no ``seq_len`` raises ``ValueError``.

    The paper's 340M config (27 RAM-Net layers) gives 28,753,920 and 449,280 ("28.8M" and "0.4M").
    """
    mixer_types = getattr(config, "mixer_types", None) or ["ramnet"] * config.num_hidden_layers
    if seq_len is not None:
        check_int("seq_len", seq_len, 1)
    full = [i for i, kind in enumerate(mixer_types) if kind == "full_attention"]
    if full and seq_len is None:
        raise ValueError(
            f"state_size: layers {full} are full_attention, whose key/value cache grows with the context; "
            f"pass seq_len (the tokens per sequence) to count them"
        )
    total = active = 0
    for kind in mixer_types:
        layer_total, layer_active = layer_state(config, kind, seq_len)
        total, active = total + layer_total, active + layer_active
    return {"total": total, "active_per_token": active}


def layer_state(config, kind: str, seq_len: int | None) -> tuple[int, int]:
    """``(total, active_per_token)`` of one layer of mixer type ``kind`` (``config`` needs the
    fields that type uses)."""
    heads, d_v, window = config.num_heads, config.head_v_dim, getattr(config, "window_size", 0)
    if kind == "sliding_attention":  # keys and values of width d_v (head_dim = head_v_dim)
        return (window - 1) * heads * 2 * d_v, window * heads * 2 * d_v
    if kind == "full_attention":
        return seq_len * heads * 2 * d_v, seq_len * heads * 2 * d_v
    if kind not in ("ramnet", "hybrid"):
        raise ValueError(f"unknown mixer type {kind!r}")
    d_k = config.num_partitions * config.partition_dim
    _, memory_slots = memory_geometry(d_k, config.num_partitions)
    if kind == "ramnet":
        return ram_state(heads, d_v, memory_slots, config.topk)
    return hybrid_state(heads, d_k, d_v, memory_slots, config.topk, window, config.hybrid_blend, config.hybrid_fw)


def ram_state(heads: int, d_v: int, memory_slots: int, topk: int) -> tuple[int, int]:
    """RAM-Net's memory: ``(H * M * (d_v + 1), H * 2K * (d_v + 1))``."""
    return heads * memory_slots * (d_v + 1), heads * 2 * topk * (d_v + 1)


def hybrid_state(heads: int, d_k: int, d_v: int, memory_slots: int, topk: int, window: int, blend: str,
                 fast_weight: str) -> tuple[int, int]:
    """A hybrid layer: its fast weights plus its key/value window (module docstring)."""
    deltanet = fast_weight == "deltanet"
    if deltanet:
        fw_total = fw_active = heads * d_k * d_v
    else:
        fw_total, fw_active = ram_state(heads, d_v, memory_slots, topk)
    cached_tokens = max(window - 1, 0) if blend == "delayed_chunk" else window
    per_token = heads * (d_k + d_v + (1 if deltanet else 0))
    return fw_total + cached_tokens * per_token, fw_active + window * heads * (d_k + d_v)
