"""State-size accounting of a RAM-Net model, per sequence, in floats (spec section 5)."""


def state_size(config) -> dict[str, int]:
    """Recurrent state of one sequence, for any config with the `RAMNetConfig` fields.

    - ``total``: every layer and head keeps `M` slots of `d_v` values plus one normaliser,
      `L * H * M * (d_v + 1)` with `M = partition_dim ** num_partitions`.
    - ``active_per_token``: a token reads K slots and writes K slots per head,
      `L * H * 2K * (d_v + 1)`.

    The paper's 340M config gives 28,753,920 and 449,280 ("28.8M" and "0.4M").
    """
    per_slot = config.head_v_dim + 1
    heads = config.num_hidden_layers * config.num_heads
    memory_slots = config.partition_dim**config.num_partitions
    return {
        "total": heads * memory_slots * per_slot,
        "active_per_token": heads * 2 * config.topk * per_slot,
    }
