from ramnet.accounting import state_size
from ramnet.models import RAMNetConfig


def test_paper_config_state_size():
    # Spec section 5: 27 * 16 * 1024 * 65 in total, 27 * 16 * 2 * 8 * 65 touched per token.
    assert state_size(RAMNetConfig()) == {"total": 28_753_920, "active_per_token": 449_280}


def test_state_size_follows_the_config():
    config = RAMNetConfig(num_hidden_layers=2, num_heads=3, head_v_dim=7, num_partitions=3, partition_dim=2, topk=5)
    # M = 2 ** 3 = 8 slots of 7 values + 1 normaliser
    assert state_size(config) == {"total": 2 * 3 * 8 * 8, "active_per_token": 2 * 3 * 2 * 5 * 8}
