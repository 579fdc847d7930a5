import pytest
import torch

from ramnet.accounting import state_size
from ramnet.models import RAMNetCache, RAMNetConfig, RAMNetForCausalLM

# H = 3 heads, d_v = 7, U = 3, d_p = 2: d_k = 6, M = 8; K = 5; S = 4
H, D_V, D_K, M, K, S = 3, 7, 6, 8, 5, 4


def config(mixer_types, **kw):
    args = dict(vocab_size=50, hidden_size=12, num_hidden_layers=len(mixer_types), num_heads=H, head_v_dim=D_V,
                num_partitions=3, partition_dim=2, topk=K, intermediate_size=16, mixer_types=mixer_types,
                window_size=S, num_cape_heads=[0] * len(mixer_types))
    return RAMNetConfig(**(args | kw))


def test_paper_config_state_size():
    # The paper's 340M model: 27 * 16 * 1024 * 65 in total, 27 * 16 * 2 * 8 * 65 touched per token.
    assert state_size(RAMNetConfig()) == {"total": 28_753_920, "active_per_token": 449_280}


def test_state_size_follows_the_config():
    config = RAMNetConfig(num_hidden_layers=2, num_heads=3, head_v_dim=7, num_partitions=3, partition_dim=2, topk=5)
    # M = 2 ** 3 = 8 slots of 7 values + 1 normaliser
    assert state_size(config) == {"total": 2 * 3 * 8 * 8, "active_per_token": 2 * 3 * 2 * 5 * 8}


@pytest.mark.parametrize(
    "mixer_type, kw, total, active",
    [
        ("ramnet", {}, H * M * (D_V + 1), H * 2 * K * (D_V + 1)),
        # RAM fast weights + S cached tokens of keys (d_k) and values (d_v); a token attends S of them
        ("hybrid", {}, H * M * (D_V + 1) + S * H * (D_K + D_V), H * 2 * K * (D_V + 1) + S * H * (D_K + D_V)),
        ("hybrid", dict(hybrid_blend="delayed_stream"), H * M * (D_V + 1) + S * H * (D_K + D_V),
         H * 2 * K * (D_V + 1) + S * H * (D_K + D_V)),
        # the chunk in progress: at most S - 1 tokens
        ("hybrid", dict(hybrid_blend="delayed_chunk"), H * M * (D_V + 1) + (S - 1) * H * (D_K + D_V),
         H * 2 * K * (D_V + 1) + S * H * (D_K + D_V)),
        # DeltaNet: the whole d_k x d_v matrix, read and rewritten per token; the window also keeps beta
        ("hybrid", dict(hybrid_fw="deltanet"), H * D_K * D_V + S * H * (D_K + D_V + 1),
         H * D_K * D_V + S * H * (D_K + D_V)),
        ("hybrid", dict(hybrid_blend="delayed_stream", window_size=0), H * M * (D_V + 1), H * 2 * K * (D_V + 1)),
        # S - 1 cached keys and values (d_v wide); a token attends S, its own included
        ("sliding_attention", {}, (S - 1) * H * 2 * D_V, S * H * 2 * D_V),
    ],
)
def test_state_size_per_mixer_type(mixer_type, kw, total, active):
    two_layers = config([mixer_type] * 2, **kw)
    assert state_size(two_layers) == {"total": 2 * total, "active_per_token": 2 * active}
    assert state_size(two_layers, seq_len=3) == state_size(two_layers)  # seq_len sizes full attention only


def test_full_attention_grows_with_the_context():
    mixed = config(["full_attention", "ramnet"])
    with pytest.raises(ValueError, match=r"layers \[0\] are full_attention.*pass seq_len"):
        state_size(mixed)
    ram = H * M * (D_V + 1), H * 2 * K * (D_V + 1)
    for seq_len in (1, 100):
        attention = seq_len * H * 2 * D_V  # every key and value; the last token attends all of them
        expected = {"total": attention + ram[0], "active_per_token": attention + ram[1]}
        assert state_size(mixed, seq_len=seq_len) == expected
    with pytest.raises(ValueError, match="seq_len must be an int >= 1"):
        state_size(mixed, seq_len=0)


@pytest.mark.parametrize("blend", ["synchronous", "delayed_stream", "delayed_chunk"])
@pytest.mark.parametrize("fw", ["ramnet", "deltanet"])
@torch.no_grad()
def test_total_is_what_the_cache_holds(blend, fw):
    # After 11 tokens (past every window; 11 = 2 S + S - 1 leaves a full chunk in progress) the
    # cache holds exactly `total` floats.
    seq_len = 2 * S + S - 1
    cfg = config(["hybrid", "sliding_attention", "full_attention", "ramnet"], hybrid_blend=blend,
                 hybrid_fw=fw)
    torch.manual_seed(0)
    model = RAMNetForCausalLM(cfg).eval()
    cache = RAMNetCache()
    model(torch.randint(0, 50, (1, 7)), past_key_values=cache, use_cache=True)
    for t in range(7, seq_len):  # chunked prefill, then decoding
        model(torch.randint(0, 50, (1, 1)), past_key_values=cache, use_cache=True)
    held = 0
    for layer in cache.layers:
        tensors = [*(layer.state or ())[:2], *(layer.window or ())[:3]]  # S, z; keys, values, betas
        held += sum(t.numel() for t in tensors if t is not None and t.is_floating_point())
    assert held == state_size(cfg, seq_len=seq_len)["total"]
