"""The fused Triton address decoder against the torch reference ``beam_topk`` (+ ``cape_shift``).

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1 before triton is imported),
which is slow: every shape here stays tiny.
"""

import pytest
import torch

from ramnet.ops.address import beam_topk, cape_shift, dense_product_softmax
from triton_skip import needs_triton

from ramnet.ops.triton_support import triton_runs_on

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = needs_triton  # the reason names what is missing: Triton, or its interpreter on CPU

if triton_runs_on(DEVICE):
    from ramnet.ops.address.triton import triton_beam_topk

TAU = 0.7
# (U, d_p, K): U = 1 with a wide partition, non-power-of-two d_p, K > d_p (beams grow over partitions),
# K > M (fewer than K slots exist), K = 1, and a large memory M = 64**8 = 2**48.
CASES = [(1, 256, 8), (2, 16, 8), (5, 4, 8), (3, 5, 7), (3, 3, 12), (2, 3, 20), (4, 6, 1), (8, 64, 8)]


def _inputs(num_partitions, d_p, rows=37, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, num_partitions * d_p, generator=gen) * 2).to(DEVICE, dtype)


def _reference(x, num_partitions, topk, shift=None):
    index, weight = beam_topk(x.float(), num_partitions, topk, TAU)
    if shift is not None:
        memory_slots = (x.shape[1] // num_partitions) ** num_partitions
        on = torch.tensor([True], device=x.device)
        index = cape_shift(index[:, None, None, :], shift[:, None], on, memory_slots)[:, 0, 0]
    return index, weight


def _assert_same_address(index, weight, ref_index, ref_weight, rtol=1e-5, atol=0.0):
    assert index.dtype == torch.int64 and weight.dtype == torch.float32 and index.shape == ref_index.shape
    # Compare as sets per row (any order among ties), with each weight following its slot.
    order, ref_order = index.argsort(-1), ref_index.argsort(-1)
    assert torch.equal(index.gather(-1, order), ref_index.gather(-1, ref_order))
    torch.testing.assert_close(weight.gather(-1, order), ref_weight.gather(-1, ref_order), rtol=rtol, atol=atol)
    assert bool((weight[:, :-1] >= weight[:, 1:]).all()), "weights must be sorted decreasing"


@pytest.mark.parametrize("num_partitions,d_p,topk", CASES)
@pytest.mark.parametrize("with_shift", [False, True])
def test_forward_matches_beam_topk(num_partitions, d_p, topk, with_shift):
    x = _inputs(num_partitions, d_p, seed=num_partitions * 1000 + d_p)
    # Positions, negative and beyond M included: the result must still be (m - s) mod M in [0, M).
    shift = torch.randint(-10**6, 10**6, (x.shape[0],), device=DEVICE) if with_shift else None
    index, weight = triton_beam_topk(x, num_partitions, topk, TAU, shift=shift)
    _assert_same_address(index, weight, *_reference(x, num_partitions, topk, shift))


@pytest.mark.parametrize("num_partitions,d_p,topk", [(1, 256, 8), (2, 16, 8), (3, 5, 7), (2, 3, 20), (4, 6, 1)])
@pytest.mark.parametrize("with_shift", [False, True])
def test_gradient_matches_autograd_through_beam_topk(num_partitions, d_p, topk, with_shift):
    x = _inputs(num_partitions, d_p, seed=7).requires_grad_()
    shift = torch.arange(x.shape[0], device=DEVICE) * 3 if with_shift else None
    index, weight = triton_beam_topk(x, num_partitions, topk, TAU, shift=shift)
    ref_index, ref_weight = _reference(x, num_partitions, topk, shift)
    # A random upstream gradient per slot, so near-ties that the kernel orders differently don't matter.
    per_slot = torch.randn(d_p**num_partitions, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (grad,) = torch.autograd.grad((weight * per_slot[index]).sum(), x)
    (ref,) = torch.autograd.grad((ref_weight * per_slot[ref_index]).sum(), x)
    torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_computes_in_fp32(dtype):
    x = _inputs(3, 8, rows=48, dtype=dtype)
    # Rounded inputs tie often: keep the rows whose K-th and (K+1)-th slots differ, so the top-K set
    # is unique (any order among ties inside it is fine: comparisons below follow the slot).
    dense = dense_product_softmax(x.double(), 3, TAU).topk(9, dim=-1).values
    x = x[dense[:, 7] > dense[:, 8] * (1 + 1e-9)].requires_grad_()
    assert x.shape[0] >= 32
    index, weight = triton_beam_topk(x, 3, 8, TAU)
    ref_index, ref_weight = _reference(x.detach(), 3, 8)  # the same rounded values, in fp32
    _assert_same_address(index, weight, ref_index, ref_weight, rtol=1e-3, atol=1e-6)
    # Rounded inputs can tie, so the upstream gradient follows the slot, not the position.
    per_slot = torch.randn(8**3, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    (grad,) = torch.autograd.grad((weight * per_slot[index]).sum(), x)
    assert grad.dtype == dtype
    xf = x.detach().float().requires_grad_()
    (ref,) = torch.autograd.grad((beam_topk(xf, 3, 8, TAU)[1] * per_slot[ref_index]).sum(), xf)
    torch.testing.assert_close(grad.float(), ref, rtol=2e-2, atol=1e-3)


def test_memory_of_2_to_the_62_slots_with_shift():
    # d_p = 2, U = 62: M = 2**62, the largest memory; indices and the CAPE shift need all of int64.
    x = _inputs(62, 2, rows=8, seed=3)
    shift = torch.tensor([0, 1, -1, 2**62 - 1, 2**62, 2**40 + 5, -(2**61), 123], device=DEVICE)
    index, weight = triton_beam_topk(x, 62, 8, TAU, shift=shift)
    _assert_same_address(index, weight, *_reference(x, 62, 8, shift))
    assert int(index.min()) >= 0 and int(index.max()) < 2**62


def test_wide_single_partition_and_ragged_rows():
    # U = 1 with d_p = 4096 (the widest partition we support) and a row count no block divides.
    x = _inputs(1, 4096, rows=5, seed=4).requires_grad_()
    index, weight = triton_beam_topk(x, 1, 8, TAU)
    ref_index, ref_weight = _reference(x, 1, 8)
    _assert_same_address(index, weight, ref_index.detach(), ref_weight.detach())
    (grad,) = torch.autograd.grad(weight.sum(), x)
    (ref,) = torch.autograd.grad(ref_weight.sum(), x)
    torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-7)


def test_non_contiguous_input():
    x = _inputs(2, 16, seed=5).t().contiguous().t()  # column-major [N, d_k]
    assert not x.is_contiguous()
    _assert_same_address(*triton_beam_topk(x, 2, 8, TAU), *_reference(x, 2, 8))
