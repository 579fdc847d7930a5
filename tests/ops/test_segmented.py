"""``ram_attention(..., time_segments=S)`` (``ops/ram/segmented.py``): a sequence cut into S pieces that
run side by side gives what one call on the whole sequence gives: outputs, final state and every
gradient (the proxy gradient of the decay included), on every path, from an empty or a given state."""

import pytest
import torch

from ramnet.ops import RAMState, ram_attention
from ramnet.ops.ram import triton as triton_path
from triton_skip import DEVICE, needs_triton

U, D_P, K, D_V = 3, 3, 4, 5  # M = 27 slots
GAMMA = [0.0, 1.0, 3.0]  # no forgetting, the EMA, fast forgetting: one per head
CAPE = [True, False, True]


def _inputs(batch, seq_len, dtype, device="cpu", with_state=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    heads, slots = len(GAMMA), D_P ** U
    qkv = [torch.randn(batch, seq_len, heads, d, generator=g, dtype=dtype) for d in (U * D_P, U * D_P, D_V)]
    state = None
    if with_state:  # a state some tokens in: non-zero S, z away from 1/M, CAPE continuing from position 7
        state = [torch.randn(batch, heads, slots, D_V, generator=g, dtype=dtype),
                 torch.rand(batch, heads, slots, generator=g, dtype=dtype) + 0.05]
    leaves = [x.to(device).requires_grad_() for x in qkv + (state or [])]
    offset = torch.arange(batch, device=device, dtype=torch.long) + 7 if with_state else None
    return leaves, offset


def _run(leaves, offset, segments, mode):
    """Output, final state and the gradients of one loss of both w.r.t. every float input."""
    q, k, v, *state = leaves
    kwargs = dict(num_partitions=U, topk=K, gamma=torch.tensor(GAMMA, dtype=q.dtype, device=q.device),
                  cape=torch.tensor(CAPE, device=q.device), output_final_state=True, mode=mode)
    initial = RAMState(*state, offset) if state else None
    o, final = ram_attention(q, k, v, initial_state=initial, time_segments=segments, **kwargs)
    weights = [torch.linspace(-1, 1, x.numel(), dtype=x.dtype, device=x.device).reshape(x.shape)
               for x in (o, final.S, final.z)]
    loss = sum((x * w).sum() for x, w in zip((o, final.S, final.z), weights))
    return [o, final.S, final.z, final.offset, *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("mode", ["naive", "recurrent", "parallel"])
@pytest.mark.parametrize("segments", [2, 3, 24])  # 24: pieces of one token
@pytest.mark.parametrize("with_state", [False, True])
def test_pieces_side_by_side_equal_one_call_in_fp64(mode, segments, with_state):
    leaves, offset = _inputs(2, 24, torch.float64, with_state=with_state)
    whole, split = _run(leaves, offset, None, mode), _run(leaves, offset, segments, mode)
    names = ["o", "final S", "final z", "final offset", "dq", "dk", "dv", "dS0", "dz0"]
    for name, a, b in zip(names, whole, split):
        assert a.shape == b.shape, name
        if a.dtype == torch.long:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)


@needs_triton
@pytest.mark.parametrize("kernels", ["token", "sorted"])
def test_triton_pieces_equal_the_parallel_path(kernels):
    leaves, offset = _inputs(1, 32, torch.float32, device=DEVICE)
    with triton_path.pdma_kernels(kernels):
        split = _run(leaves, offset, 4, "triton")
    whole = _run(leaves, offset, None, "parallel")
    for a, b in zip(whole, split):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_one_segment_is_the_plain_call():
    leaves, offset = _inputs(1, 12, torch.float64)
    for a, b in zip(_run(leaves, offset, None, "parallel"), _run(leaves, offset, 1, "parallel")):
        assert torch.equal(a, b)


@pytest.mark.parametrize("segments, match", [(5, "divide the sequence length T=12"), (0, "int >= 1"),
                                             (True, "int >= 1"), (2.0, "int >= 1")])
def test_bad_time_segments_are_refused(segments, match):
    q = torch.randn(1, 12, 3, U * D_P)
    with pytest.raises(ValueError, match=match):
        ram_attention(q, q, torch.randn(1, 12, 3, D_V), num_partitions=U, topk=K, time_segments=segments)


def test_time_segments_take_no_packed_sequences():
    q = torch.randn(1, 12, 3, U * D_P)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ram_attention(q, q, torch.randn(1, 12, 3, D_V), num_partitions=U, topk=K, time_segments=2,
                      cu_seqlens=torch.tensor([0, 4, 12]))
