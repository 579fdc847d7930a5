"""Huge memories (M up to 2**62): the paths whose memory grows with T * K run, the paths that would
build an N x H x M state refuse up front with one clear size check (issue 15, item 5)."""

import pytest
import torch

from ramnet.layers import RAMAttention
from ramnet.models import RAMNetConfig, RAMNetForCausalLM
from ramnet.ops import ram_attention

U, DP = 31, 4  # M = 4**31 = 2**62, the largest memory allowed
HUGE = dict(num_partitions=U, topk=3)


def _inputs(seq_len=9, heads=2, d_v=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, seq_len, heads, U * DP, generator=gen, dtype=torch.float64) for _ in range(2))
    return q, k, torch.randn(1, seq_len, heads, d_v, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["parallel", "triton"])
def test_packed_sequences_beyond_an_int64_sort_key_match_each_sequence_alone(mode):
    # 3 sequences x 2**62 slots: the combined (sequence, slot) key of sort_events would pass 2**63.
    q, k, v = _inputs()
    if mode == "triton":  # fp32 kernels (the interpreter on CPU)
        q, k, v = q.float(), k.float(), v.float()
    bounds = [0, 2, 5, 9]
    cape = torch.tensor([True, False])
    o, _ = ram_attention(q, k, v, **HUGE, cape=cape, cu_seqlens=torch.tensor(bounds), mode=mode)
    for start, end in zip(bounds[:-1], bounds[1:]):
        alone, _ = ram_attention(q[:, start:end], k[:, start:end], v[:, start:end], **HUGE, cape=cape, mode=mode)
        torch.testing.assert_close(o[:, start:end], alone, rtol=1e-6, atol=1e-6)


def test_one_token_without_a_state_runs_at_huge_m():
    # mode None picks the recurrent step only when it continues or returns a state.
    q, k, v = _inputs(seq_len=1)
    o, state = ram_attention(q, k, v, **HUGE)
    assert state is None and o.shape == v.shape and bool(o.isfinite().all())


@pytest.mark.parametrize("kw", [dict(mode="naive"), dict(mode="recurrent"), dict(mode="parallel", output_final_state=True),
                                dict(mode="triton", output_final_state=True), dict(output_final_state=True)])
def test_paths_that_build_the_state_refuse_with_a_size_error(kw):
    q, k, v = _inputs()
    if kw.get("mode") == "triton":
        q, k, v = q.float(), k.float(), v.float()
    with pytest.raises(ValueError, match=r"builds S \[3, 2, 4611686018427387904, 3\].*bytes.*use mode='parallel' or "
                                         r"'triton' without output_final_state"):
        ram_attention(q, k, v, **HUGE, cu_seqlens=torch.tensor([0, 2, 5, 9]), **kw)


def test_layer_runs_a_padded_batch_of_three_at_huge_m():
    torch.manual_seed(0)
    layer = RAMAttention(hidden_size=16, num_heads=2, head_v_dim=4, num_partitions=U, partition_dim=DP, topk=2,
                         cape=[True, False]).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    o, _, _ = layer(x, attention_mask=mask)
    assert bool(o.isfinite().all()) and bool((o[1, :2] == 0).all())


def _huge_model():
    torch.manual_seed(0)
    config = RAMNetConfig(vocab_size=11, hidden_size=16, num_hidden_layers=1, num_heads=2, head_v_dim=4,
                          num_partitions=U, partition_dim=DP, topk=2, intermediate_size=16, num_cape_heads=[1])
    return RAMNetForCausalLM(config).eval()


def test_model_scores_at_huge_m_without_building_a_cache():
    model = _huge_model()
    ids = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(1))
    out = model(ids, labels=ids)  # scoring: no cache unless asked
    assert out.past_key_values is None and bool(out.loss.isfinite())
    assert model(ids, use_cache=False).past_key_values is None
    model.train()
    assert model(ids).past_key_values is None  # training forwards build no cache either


def test_model_forward_that_builds_a_cache_at_huge_m_names_the_sizes():
    model = _huge_model()
    ids = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(1))
    for kwargs in (dict(), dict(use_cache=True), dict(labels=ids, use_cache=True)):  # eval default: config.use_cache
        with pytest.raises(ValueError, match=r"output_final_state=True builds S \[3, 2, 4611686018427387904, 4\].*"
                                             r"use_cache=False"):
            model(ids, **kwargs)
