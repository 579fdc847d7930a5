"""naive == recurrent == parallel, chunking, PDMA and CAPE properties of ram_attention."""

import pytest
import torch

from ramnet.ops import RAMState, address_decode, ram_attention

MODES = ["naive", "recurrent", "parallel"]


def _inputs(seed, batch, seq_len, heads, num_partitions, d_p, d_v, dtype, scale=1.5):
    gen = torch.Generator().manual_seed(seed)
    d_k = num_partitions * d_p
    q = torch.randn(batch, seq_len, heads, d_k, dtype=dtype, generator=gen) * scale
    k = torch.randn(batch, seq_len, heads, d_k, dtype=dtype, generator=gen) * scale
    v = torch.randn(batch, seq_len, heads, d_v, dtype=dtype, generator=gen)
    return q, k, v


def _random_state(seed, num_seqs, heads, memory_slots, d_v, dtype):
    gen = torch.Generator().manual_seed(seed)
    return RAMState(
        torch.randn(num_seqs, heads, memory_slots, d_v, dtype=dtype, generator=gen),
        torch.rand(num_seqs, heads, memory_slots, dtype=dtype, generator=gen) + 0.05,
        torch.randint(0, 50, (num_seqs,), generator=gen),
    )


def _run(mode, q, k, v, **kw):
    """Output, final state and gradients of a fixed scalar loss w.r.t. q, k, v (and the state)."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    state = kw.pop("initial_state", None)
    leaves = [q, k, v]
    if state is not None:
        state = RAMState(state.S.detach().requires_grad_(), state.z.detach().requires_grad_(), state.offset)
        leaves += [state.S, state.z]
    o, final = ram_attention(q, k, v, initial_state=state, output_final_state=True, mode=mode, **kw)
    weights = torch.linspace(-1, 1, o.shape[-1], dtype=o.dtype)
    loss = (o * weights).sum() + (final.S * 0.3).sum() + final.z.sum()
    grads = torch.autograd.grad(loss, leaves)
    return o, final, grads


CONFIGS = [
    # seed, batch, T, heads, U, d_p, d_v, K, gamma per head, cape per head, initial state, cu_seqlens
    (0, 2, 17, 2, 2, 3, 4, 3, [0.0, 1.0], [True, False], False, None),
    (1, 1, 25, 3, 3, 2, 5, 4, [0.5, 2.0, 1.0], [False, True, True], True, None),
    (2, 1, 30, 2, 1, 6, 3, 2, [1.0, 0.5], [True, True], True, [0, 7, 7, 19, 30]),
    (3, 3, 12, 1, 4, 2, 4, 5, [2.0], [True], True, None),
    (4, 1, 21, 2, 2, 4, 6, 1, [0.0, 0.5], [False, False], False, [0, 1, 10, 21]),
    (5, 2, 40, 2, 3, 3, 4, 8, [1.0, 1.0], [True, False], False, None),
]


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-10, 1e-10), (torch.float32, 1e-4, 1e-5)])
@pytest.mark.parametrize("config", CONFIGS, ids=[f"cfg{c[0]}" for c in CONFIGS])
def test_paths_agree(config, dtype, rtol, atol):
    seed, batch, seq_len, heads, num_partitions, d_p, d_v, topk, gamma, cape, with_state, cu = config
    q, k, v = _inputs(seed, batch, seq_len, heads, num_partitions, d_p, d_v, dtype)
    cu_seqlens = None if cu is None else torch.tensor(cu)
    num_seqs = batch if cu is None else len(cu) - 1
    kw = dict(num_partitions=num_partitions, topk=topk, gamma=torch.tensor(gamma), cape=torch.tensor(cape),
              cu_seqlens=cu_seqlens, tau=0.8)
    if with_state:
        kw["initial_state"] = _random_state(seed, num_seqs, heads, d_p**num_partitions, d_v, dtype)
    ref_o, ref_state, ref_grads = _run("naive", q, k, v, **dict(kw))
    assert ref_o.dtype == dtype and ref_o.shape == v.shape
    for mode in ["recurrent", "parallel"]:
        o, state, grads = _run(mode, q, k, v, **dict(kw))
        torch.testing.assert_close(o, ref_o, rtol=rtol, atol=atol)
        torch.testing.assert_close(state.S, ref_state.S, rtol=rtol, atol=atol)
        torch.testing.assert_close(state.z, ref_state.z, rtol=rtol, atol=atol)
        assert torch.equal(state.offset, ref_state.offset)
        for grad, ref in zip(grads, ref_grads):
            torch.testing.assert_close(grad, ref, rtol=rtol, atol=atol)
    expected_offset = (0 if not with_state else kw["initial_state"].offset) + (
        torch.full((num_seqs,), seq_len) if cu is None else torch.tensor(cu).diff()
    )
    assert torch.equal(ref_state.offset, expected_offset)


@pytest.mark.parametrize("mode", MODES)
def test_chunked_calls_equal_one_call(mode):
    q, k, v = _inputs(7, 2, 23, 2, 2, 3, 4, torch.float64)
    kw = dict(num_partitions=2, topk=3, gamma=torch.tensor([0.5, 1.0]), cape=torch.tensor([True, False]), mode=mode)
    full_o, full_state = ram_attention(q, k, v, output_final_state=True, **kw)
    state, outs = None, []
    for start, end in [(0, 1), (1, 9), (9, 10), (10, 23)]:
        o, state = ram_attention(q[:, start:end], k[:, start:end], v[:, start:end], initial_state=state,
                                 output_final_state=True, **kw)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full_o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.S, full_state.S, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.z, full_state.z, rtol=1e-12, atol=1e-12)
    assert state.offset.tolist() == [23, 23]


def test_varlen_equals_separate_calls():
    q, k, v = _inputs(8, 1, 20, 2, 2, 3, 4, torch.float64)
    kw = dict(num_partitions=2, topk=2, cape=True, output_final_state=True)
    bounds = [0, 6, 13, 20]
    o, state = ram_attention(q, k, v, cu_seqlens=torch.tensor(bounds), **kw)
    for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        o_n, state_n = ram_attention(q[:, s:e], k[:, s:e], v[:, s:e], **kw)
        torch.testing.assert_close(o[:, s:e], o_n, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state.S[n : n + 1], state_n.S, rtol=1e-12, atol=1e-12)


def _pdma_by_hand(k, v, gamma, num_partitions, topk):
    """Per-slot PDMA from the decoded write addresses, one head, one sequence, no CAPE."""
    indices, weights = address_decode(k, num_partitions=num_partitions, topk=topk)
    memory_slots = (k.shape[-1] // num_partitions) ** num_partitions
    S = torch.zeros(memory_slots, v.shape[-1], dtype=v.dtype)
    z = torch.full((memory_slots,), 1.0 / memory_slots, dtype=v.dtype)
    written = torch.zeros(memory_slots, dtype=torch.bool)
    for t in range(k.shape[0]):
        for slot, w in zip(indices[t].tolist(), weights[t].tolist()):
            S[slot] = (1 - w) ** gamma * S[slot] + w * v[t]
            z[slot] = (1 - w) ** gamma * z[slot] + w
            written[slot] = True
    return S, z, written


@pytest.mark.parametrize("gamma", [0.0, 1.0])
@pytest.mark.parametrize("mode", ["recurrent", "parallel"])
def test_pdma_is_a_per_slot_moving_average(gamma, mode):
    q, k, v = _inputs(9, 1, 8, 1, 2, 6, 3, torch.float64)  # M = 36 > 8 * 3 writes
    _, state = ram_attention(q, k, v, num_partitions=2, topk=3, gamma=gamma, output_final_state=True, mode=mode)
    S, z, written = _pdma_by_hand(k[0, :, 0], v[0, :, 0], gamma, 2, 3)
    torch.testing.assert_close(state.S[0, 0], S, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.z[0, 0], z, rtol=1e-12, atol=1e-12)
    assert 0 < int(written.sum()) < 36, "the test needs both written and unwritten slots"
    if gamma == 0.0:  # nothing forgotten: S is the weighted sum of every write, z the total weight
        indices, weights = address_decode(k[0, :, 0], num_partitions=2, topk=3)
        total = torch.zeros(36, 3, dtype=torch.float64).index_add_(0, indices.flatten(),
                                                                   (weights[..., None] * v[0, :, 0, None]).flatten(0, 1))
        torch.testing.assert_close(state.S[0, 0], total, rtol=1e-12, atol=1e-12)
    # Slots never written keep S = 0 and z = 1/M exactly.
    assert torch.equal(state.S[0, 0][~written], torch.zeros_like(state.S[0, 0][~written]))
    assert bool((state.z[0, 0][~written] == 1 / 36).all())


def test_unwritten_slots_are_never_read():
    # Keys always address slot 0, queries slot M-1: the memory the queries read is empty.
    seq_len, d_p = 6, 4
    k = torch.full((1, seq_len, 1, 2 * d_p), -20.0, dtype=torch.float64)
    k[..., 0] = k[..., d_p] = 20.0
    q = torch.full_like(k, -20.0)
    q[..., d_p - 1] = q[..., 2 * d_p - 1] = 20.0
    v = torch.randn(1, seq_len, 1, 3, dtype=torch.float64)
    for mode in MODES:
        o, _ = ram_attention(q, k, v, num_partitions=2, topk=1, mode=mode)
        assert torch.equal(o, torch.zeros_like(o)), mode
        o_self, _ = ram_attention(k, k, v, num_partitions=2, topk=1, gamma=1.0, mode=mode)
        assert o_self.abs().min() > 0  # the same slot read back holds the values


@pytest.mark.parametrize("mode", MODES)
def test_cape_shift_moves_every_slot(mode):
    # Constant q and k: starting p positions later moves each slot's content by -p mod M.
    seq_len, memory_slots, shift = 9, 16, 5
    gen = torch.Generator().manual_seed(4)
    k = torch.randn(1, 1, 2, 8, dtype=torch.float64, generator=gen).expand(1, seq_len, 2, 8)
    v = torch.randn(1, seq_len, 2, 3, dtype=torch.float64, generator=gen)
    kw = dict(num_partitions=2, topk=3, cape=True, output_final_state=True, mode=mode)
    _, base = ram_attention(k, k, v, **kw)
    start = RAMState.empty(1, 2, memory_slots, 3, dtype=torch.float64, device="cpu")
    start = start._replace(offset=torch.tensor([shift]))
    _, moved = ram_attention(k, k, v, initial_state=start, **kw)
    torch.testing.assert_close(moved.S, base.S.roll(-shift, dims=2), rtol=0, atol=0)
    torch.testing.assert_close(moved.z, base.z.roll(-shift, dims=2), rtol=0, atol=0)
    assert not torch.equal(moved.S, base.S)


def test_low_precision_inputs_give_low_precision_output_and_fp32_state():
    q, k, v = _inputs(10, 1, 12, 2, 2, 3, 4, torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        # Against the same (rounded) values in fp32: rounding to bf16 ties q's row 12 at the K-th
        # slot, where the tie rule may pick another slot than the unrounded values' order.
        ref, ref_state = ram_attention(*(x.to(dtype).float() for x in (q, k, v)), num_partitions=2, topk=3,
                                       output_final_state=True)
        o, state = ram_attention(q.to(dtype), k.to(dtype), v.to(dtype), num_partitions=2, topk=3,
                                 output_final_state=True)
        assert o.dtype == dtype and state.S.dtype == torch.float32 and state.z.dtype == torch.float32
        torch.testing.assert_close(o.float(), ref, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(state.S, ref_state.S)


def test_default_mode_decodes_one_token_with_recurrent_and_trains_with_parallel():
    q, k, v = _inputs(11, 1, 10, 1, 2, 3, 4, torch.float64)
    kw = dict(num_partitions=2, topk=2, output_final_state=True)
    o_full, _ = ram_attention(q, k, v, **kw)
    _, state = ram_attention(q[:, :9], k[:, :9], v[:, :9], **kw)
    o_last, _ = ram_attention(q[:, 9:], k[:, 9:], v[:, 9:], initial_state=state, **kw)
    torch.testing.assert_close(o_last, o_full[:, 9:], rtol=1e-12, atol=1e-12)


def test_inplace_decoding_updates_the_state_tensors_and_matches_one_call():
    q, k, v = _inputs(12, 2, 9, 2, 2, 3, 4, torch.float64)
    kw = dict(num_partitions=2, topk=3, cape=torch.tensor([True, False]))
    full, full_state = ram_attention(q, k, v, output_final_state=True, **kw)
    state = RAMState.empty(2, 2, 9, 4, dtype=torch.float64, device="cpu")
    outs = []
    with torch.no_grad():
        for t in range(9):
            o, new = ram_attention(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], initial_state=state,
                                   inplace_state=True, **kw)
            assert new.S is state.S and new.z is state.z and new.offset is state.offset
            outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.S, full_state.S, rtol=1e-12, atol=1e-12)
    assert state.offset.tolist() == [9, 9]


def test_inplace_decoding_errors():
    q, k, v = _inputs(13, 1, 1, 1, 2, 3, 4, torch.float32)
    kw = dict(num_partitions=2, topk=3, inplace_state=True)
    with pytest.raises(ValueError, match="needs an initial_state"):
        ram_attention(q, k, v, **kw)
    state = RAMState.empty(1, 1, 9, 4, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="runs the recurrent path"):
        ram_attention(q, k, v, initial_state=state, mode="parallel", **kw)
    with pytest.raises(ValueError, match="without autograd"):
        ram_attention(q.requires_grad_(), k, v, initial_state=state, **kw)
    with pytest.raises(ValueError, match="compute dtype"):
        ram_attention(q.detach(), k, v, initial_state=RAMState(state.S.double(), state.z.double(), state.offset), **kw)


@pytest.mark.parametrize("batch", [1, 2])
def test_parallel_path_continues_a_state_with_one_slot_per_token_and_several_heads(batch):
    # Found by tests/ops/test_fuzz.py: with K = 1 and H > 1 the read slots stayed a transposed view, the
    # initial rows gathered by them too, and the parallel path's .view of them failed.
    q, k, v = _inputs(21, batch, 4, 2, 2, 2, 3, torch.float64)
    kw = dict(num_partitions=2, topk=1, output_final_state=True)
    start = RAMState(torch.randn(batch, 2, 4, 3, dtype=torch.float64), torch.rand(batch, 2, 4, dtype=torch.float64) + 0.1,
                     torch.arange(batch) + 3)
    ref, ref_state = ram_attention(q, k, v, initial_state=start, mode="naive", **kw)
    o, state = ram_attention(q, k, v, initial_state=start, mode="parallel", **kw)
    torch.testing.assert_close(o, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.S, ref_state.S, rtol=1e-10, atol=1e-10)
