"""The address decoder against brute force over the dense product softmax."""


import pytest
import torch

from ramnet.ops import address_decode
from ramnet.ops.address import cape_dense, cape_shift, dense_product_softmax

CASES = [(u, d_p) for u in range(1, 6) for d_p in range(2, 9)]  # M up to 8**5 = 32768


@pytest.mark.parametrize("num_partitions,d_p", CASES)
def test_beam_search_equals_brute_force_top_k(num_partitions, d_p):
    gen = torch.Generator().manual_seed(num_partitions * 100 + d_p)
    memory_slots = d_p**num_partitions
    x = torch.randn(6, 3, num_partitions * d_p, dtype=torch.float64, generator=gen) * 2
    for topk in sorted({1, 2, min(memory_slots, 5), min(memory_slots, 16)}):
        indices, weights = address_decode(x, num_partitions=num_partitions, topk=topk, tau=0.7)
        dense = dense_product_softmax(x, num_partitions, 0.7)
        ref_w, ref_i = dense.topk(topk, dim=-1)
        assert indices.dtype == torch.int64 and indices.shape == (6, 3, topk)
        assert torch.equal(indices, ref_i)
        torch.testing.assert_close(weights, ref_w, rtol=1e-12, atol=0)
        assert bool((weights[..., :-1] >= weights[..., 1:]).all()), "weights must be sorted decreasing"


def test_slot_index_has_first_partition_most_significant():
    # Partition u strongly prefers entry c_u; the winning slot must be sum_u c_u * d_p**(U-1-u).
    d_p, choice = 5, [3, 0, 4]
    x = torch.full((len(choice), d_p), -10.0)
    for u, c in enumerate(choice):
        x[u, c] = 10.0
    indices, _ = address_decode(x.reshape(-1), num_partitions=3, topk=1)
    assert indices.item() == 3 * 25 + 0 * 5 + 4


def test_weight_gradient_matches_dense_product_softmax():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 12, dtype=torch.float64, generator=gen, requires_grad=True)
    coeff = torch.randn(4, 5, dtype=torch.float64, generator=gen)
    _, weights = address_decode(x, num_partitions=3, topk=5)
    (grad,) = torch.autograd.grad((weights * coeff).sum(), x)
    ref_w, _ = dense_product_softmax(x, 3, 1.0).topk(5, dim=-1)
    (ref,) = torch.autograd.grad((ref_w * coeff).sum(), x)
    torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-12)


def test_huge_memory_decodes_without_m_sized_tensors():
    # d_p = 64, U = 8: M = 2**48 slots, so any M-sized tensor (a petabyte) would fail to allocate. (Its
    # speed is a benchmark's business, not a timed test's: a loaded CI machine makes timings flaky.)
    x = torch.randn(1000, 8 * 64, generator=torch.Generator().manual_seed(1))
    indices, weights = address_decode(x, num_partitions=8, topk=16)
    assert int(indices.max()) < 64**8 and int(indices.min()) >= 0
    # Spot-check exactness: the best slot is the per-partition argmax, and the best weight their product.
    logp = torch.log_softmax(x.view(1000, 8, 64), -1)
    best = logp.argmax(-1)
    expected = sum(best[:, u] * 64 ** (7 - u) for u in range(8))
    assert torch.equal(indices[:, 0], expected)
    torch.testing.assert_close(weights[:, 0], logp.max(-1).values.sum(-1).exp())
    assert len(set(map(tuple, indices[:20].tolist()))) == 20


def test_output_dtype_follows_input():
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    indices, weights = address_decode(x, num_partitions=2, topk=3)
    assert weights.dtype == torch.bfloat16 and indices.dtype == torch.int64


def test_cape_sparse_shift_equals_dense_definition():
    gen = torch.Generator().manual_seed(3)
    memory_slots, topk = 27, 4
    x = torch.randn(2, 5, 3, 9, dtype=torch.float64, generator=gen)  # [B, T, H, d_k]
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 30, 31, 60]])
    enabled = torch.tensor([True, False, True])
    indices, weights = address_decode(x, num_partitions=3, topk=topk)
    shifted = cape_shift(indices, positions, enabled, memory_slots)
    sparse_dense = torch.zeros(2, 5, 3, memory_slots, dtype=torch.float64).scatter(-1, shifted, weights)
    dense = torch.zeros_like(sparse_dense).scatter(-1, indices, weights)
    expected = cape_dense(dense, positions[:, :, None] * enabled.long())
    torch.testing.assert_close(sparse_dense, expected, rtol=0, atol=0)


def test_cape_moves_slot_j_to_j_minus_t():
    a = torch.zeros(10)
    a[6] = 1.0
    for t, slot in [(0, 6), (2, 4), (6, 0), (7, 9), (25, 1)]:
        assert cape_dense(a, torch.tensor(t)).argmax().item() == slot
