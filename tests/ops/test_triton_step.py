"""The Triton decoding step against the torch step (``pdma_step``) and the recurrent path.

On CPU the kernel runs under Triton's interpreter:
    TRITON_INTERPRET=1 python -m pytest -q tests/ops/test_triton_step.py
"""

from functools import partial

import pytest
import torch

from ramnet.ops import RAMState, ram_attention
from ramnet.ops.ram import pdma_step
from ramnet.ops.ram.common import decode_tokens
from triton_skip import needs_triton

from ramnet.ops.triton_support import triton_runs_on

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = needs_triton  # the reason names what is missing: Triton, or its interpreter on CPU

if triton_runs_on(DEVICE):
    from ramnet.ops.ram.step import decode_spec, pdma_step_triton, ram_decode_step


def _addresses(batch, heads, slots, topk, overlap, gen):
    """Distinct write slots per row; read slots disjoint from them ("none"), the same slots in
    another order ("all"), or about half of them shared ("partial")."""
    write, read = [], []
    for _ in range(batch * heads):
        perm = torch.randperm(slots, generator=gen)
        w = perm[:topk]
        if overlap == "none":
            r = perm[topk : 2 * topk]
        elif overlap == "all":
            r = w[torch.randperm(topk, generator=gen)]
        else:
            shared = (topk + 1) // 2
            r = torch.cat([w[:shared], perm[topk : 2 * topk - shared]])[torch.randperm(topk, generator=gen)]
        write.append(w)
        read.append(r)
    shape = (batch, heads, topk)
    return torch.stack(write).view(shape), torch.stack(read).view(shape)


@pytest.mark.parametrize(
    "batch, heads, slots, d_v, topk, overlap, v_dtype, strided",
    [
        (2, 3, 64, 16, 4, "none", torch.float32, False),
        (2, 3, 64, 20, 5, "partial", torch.float32, False),  # d_v, K not powers of two
        (1, 4, 32, 7, 8, "all", torch.bfloat16, False),
        (3, 2, 16, 12, 1, "all", torch.float32, True),  # K = 1; S and z views of larger tensors
        (1, 2, 64, 600, 8, "partial", torch.float32, False),  # several d_v tiles
    ],
)
def test_kernel_matches_pdma_step(batch, heads, slots, d_v, topk, overlap, v_dtype, strided):
    gen = torch.Generator().manual_seed(slots + d_v + topk)
    S0 = torch.randn(batch, heads, slots, d_v + 3, generator=gen)[..., :d_v]
    z0 = (torch.rand(batch, heads, slots, 2, generator=gen) + 0.1)[..., 0]
    if not strided:
        S0, z0 = S0.contiguous(), z0.contiguous()
    write_idx, read_idx = _addresses(batch, heads, slots, topk, overlap, gen)
    write_w, decay, read_w = (torch.rand(batch, heads, topk, generator=gen) for _ in range(3))
    v = torch.randn(batch, heads, d_v, generator=gen).to(v_dtype)
    moved = [x.to(DEVICE) for x in (write_idx, write_w, decay, v, read_idx, read_w)]

    S_ref, z_ref = S0.clone().to(DEVICE), z0.clone().to(DEVICE)
    _, _, o_ref = pdma_step(S_ref, z_ref, *moved[:3], moved[3].float(), *moved[4:], 1e-6, inplace=True)
    S = torch.randn(batch, heads, slots, d_v + 3)[..., :d_v].copy_(S0).to(DEVICE) if strided else S0.clone().to(DEVICE)
    z = torch.rand(batch, heads, slots, 2)[..., 0].copy_(z0).to(DEVICE) if strided else z0.clone().to(DEVICE)
    if strided and DEVICE == "cpu":
        assert not S.is_contiguous() and not z.is_contiguous()
    o = pdma_step_triton(S, z, *moved, 1e-6)

    assert o.dtype == torch.float32 and o.shape == (batch, heads, d_v)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(S, S_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-6)
    written = torch.zeros(batch, heads, slots, dtype=torch.bool).scatter_(2, write_idx, True).to(DEVICE)
    assert torch.equal(S[~written], S0.to(DEVICE)[~written])  # untouched rows: bit for bit
    assert torch.equal(z[~written], z0.to(DEVICE)[~written])


def _decode_problem(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch, steps, heads, d_k, d_v = 2, 6, 4, 12, 10
    q, k = (torch.randn(batch, steps, heads, d_k, generator=gen) * 1.5 for _ in range(2))
    v = torch.randn(batch, steps, heads, d_v, generator=gen)
    state = RAMState(torch.randn(batch, heads, 64, d_v, generator=gen),
                     torch.rand(batch, heads, 64, generator=gen) + 0.1, torch.tensor([0, 9]))
    return [x.to(DEVICE, dtype) for x in (q, k, v)], RAMState(*(x.to(DEVICE) for x in state))


HYPER = dict(num_partitions=3, topk=5, gamma=torch.tensor([0.0, 0.5, 1.0, 2.0]),
             cape=torch.tensor([True, False, True, False]))


@pytest.mark.parametrize("triton_decode", [False, True], ids=["torch_decode", "triton_decode"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_match_recurrent_path(dtype, triton_decode):
    (q, k, v), state = _decode_problem(dtype)
    o_ref, final = ram_attention(q, k, v, initial_state=state, output_final_state=True, mode="recurrent", **HYPER)

    spec = decode_spec(4, 12, device=DEVICE, **HYPER)
    live = RAMState(*(x.clone() for x in state))
    o = torch.stack([ram_decode_step(q[:, t], k[:, t], v[:, t], live, spec, triton_decode=triton_decode)
                     for t in range(q.shape[1])], dim=1)

    assert o.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(o, o_ref, **tol)
    torch.testing.assert_close(live.S, final.S, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(live.z, final.z, rtol=1e-5, atol=1e-6)
    assert torch.equal(live.offset, state.offset + q.shape[1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("triton_decode", [False, True], ids=["torch_decode", "triton_decode"])
def test_cuda_graph_replay_matches_eager_steps(triton_decode):
    (q, k, v), state = _decode_problem(torch.bfloat16)
    spec = decode_spec(4, 12, device="cuda", **HYPER)
    step = partial(ram_decode_step, spec=spec, triton_decode=triton_decode)
    eager_state = RAMState(*(x.clone() for x in state))
    eager = [step(q[:, t], k[:, t], v[:, t], eager_state) for t in range(q.shape[1])]

    graph_state = RAMState(*(x.clone() for x in state))
    q_in, k_in, v_in = q[:, 0].clone(), k[:, 0].clone(), v[:, 0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles the kernel) off the capturing stream
        for _ in range(2):
            step(q_in, k_in, v_in, graph_state)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_out = step(q_in, k_in, v_in, graph_state)
    for dst, src in zip(graph_state, state):  # warm-up and capture may have run the step: start over
        dst.copy_(src)

    replayed = []
    for t in range(q.shape[1]):
        q_in.copy_(q[:, t])
        k_in.copy_(k[:, t])
        v_in.copy_(v[:, t])
        graph.replay()
        replayed.append(o_out.clone())
    torch.cuda.synchronize()
    # The same kernels on the same numbers (up to the inputs' memory layout, and bf16 rounding of o).
    for got, want in zip(replayed, eager):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(graph_state.S, eager_state.S, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(graph_state.z, eager_state.z, rtol=1e-6, atol=1e-6)
    assert torch.equal(graph_state.offset, state.offset + q.shape[1])


@pytest.mark.parametrize("num_partitions,d_k,topk", [(1, 8, 1), (2, 12, 4), (3, 12, 5), (4, 8, 8)])
def test_fused_step_matches_the_torch_decoder_step(num_partitions, d_k, topk):
    """The step kernel that decodes its own addresses (triton_decode=True) against the torch decoder
    followed by the step kernel, over shapes where K is 1, below d_p, above d_p, and a CAPE
    position far beyond M."""
    gen = torch.Generator().manual_seed(num_partitions)
    batch, heads, d_v, steps = 3, 2, 24, 4  # d_v 24: two column blocks of 16
    slots = (d_k // num_partitions) ** num_partitions
    q, k = (torch.randn(batch, steps, heads, d_k, generator=gen) * 2 for _ in range(2))
    v = torch.randn(batch, steps, heads, d_v, generator=gen)
    state = RAMState(torch.randn(batch, heads, slots, d_v, generator=gen),
                     torch.rand(batch, heads, slots, generator=gen) + 0.1, torch.tensor([0, 5, 123_456_789]))
    spec = decode_spec(heads, d_k, num_partitions=num_partitions, topk=topk, gamma=torch.tensor([0.5, 1.0]),
                       cape=torch.tensor([True, False]), device=DEVICE)
    states = {fused: RAMState(*(x.clone().to(DEVICE) for x in state)) for fused in (False, True)}
    for t in range(steps):
        q_t, k_t, v_t = (x[:, t].to(DEVICE) for x in (q, k, v))
        outs = {fused: ram_decode_step(q_t, k_t, v_t, states[fused], spec, triton_decode=fused) for fused in (False, True)}
        torch.testing.assert_close(outs[True], outs[False], rtol=1e-5, atol=1e-6)
    for a, b in zip(states[True], states[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(states[True].offset.cpu(), state.offset + steps)


# "fused" (today's kernel) is also checked by the tests above.
TRITON_LAYOUTS = ["fused", "dense", "split", "separate"]


def _torch_step(q, k, v, state, spec):
    """recurrent.py's step in torch: the torch decoder (in the state's dtype), then ``pdma_step``."""
    compute = state.S.dtype
    write_idx, write_w, decay, read_idx, read_w = decode_tokens(q[:, None].to(compute), k[:, None].to(compute), spec,
                                                                state.offset[:, None])
    _, _, o = pdma_step(state.S, state.z, write_idx[:, 0], write_w[:, 0], decay[:, 0], v.to(compute),
                        read_idx[:, 0], read_w[:, 0], spec.eps, inplace=True)
    state.offset.add_(1)
    return o


# (U, d_p, K, d_v, B, H, state dtype): K 1, 3, 5, 8 and 16 (= M), M not a power of two (9, 27),
# d_v not a multiple of the split's 16 columns, fp64 state.
LAYOUT_CASES = [
    (3, 4, 5, 20, 2, 2, torch.float32),  # every layout here; the fused one only here below
    (2, 3, 3, 7, 1, 3, torch.float32),
    (1, 8, 1, 16, 2, 1, torch.float32),
    (2, 4, 16, 5, 1, 2, torch.float32),
    (4, 2, 8, 33, 1, 2, torch.float64),
    (3, 3, 8, 12, 2, 1, torch.float32),
]


@pytest.mark.parametrize("layout, num_partitions, d_p, topk, d_v, batch, heads, dtype",
                         [(layout, *case) for case in LAYOUT_CASES for layout in TRITON_LAYOUTS
                          if layout != "fused" or case is LAYOUT_CASES[0]])
def test_layouts_match_the_torch_recurrent_step(layout, num_partitions, d_p, topk, d_v, batch, heads, dtype):
    """Every layout of ram_decode_step against the torch step over several steps: q, k on a
    quarter grid (exact ties inside and across partitions), CAPE on some heads, gamma 0, 1, 2 and
    0.5, positions far beyond M, in place, offset advanced."""
    gen = torch.Generator().manual_seed(num_partitions * 100 + topk + d_v)
    d_k, slots, steps = num_partitions * d_p, d_p**num_partitions, 2
    q, k = (((torch.randn(steps, batch, heads, d_k, generator=gen) * 4).round() / 4) for _ in range(2))
    v = torch.randn(steps, batch, heads, d_v, generator=gen)
    gamma = torch.tensor([0.0, 1.0, 2.0, 0.5])[torch.arange(heads) % 4]
    spec = decode_spec(heads, d_k, num_partitions=num_partitions, topk=topk, gamma=gamma,
                       cape=torch.arange(heads) % 2 == 0, device=DEVICE, dtype=dtype)
    start = RAMState(torch.randn(batch, heads, slots, d_v, generator=gen, dtype=dtype),
                     torch.rand(batch, heads, slots, generator=gen, dtype=dtype) + 0.1,
                     torch.tensor([0, 7, 123_456_789])[:batch])
    ref, live = (RAMState(*(x.clone().to(DEVICE) for x in start)) for _ in range(2))
    S_id = live.S.data_ptr()
    for t in range(steps):
        q_t, k_t, v_t = (x[t].to(DEVICE) for x in (q, k, v))
        want = _torch_step(q_t, k_t, v_t, ref, spec)
        got = ram_decode_step(q_t, k_t, v_t, live, spec, layout=layout)
        assert got.dtype == v_t.dtype
        torch.testing.assert_close(got.to(dtype), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(live.S, ref.S, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(live.z, ref.z, rtol=1e-5, atol=1e-5)
    assert torch.equal(live.offset, ref.offset) and live.S.data_ptr() == S_id


def test_default_layout_is_the_measured_winner_and_fp64_takes_the_torch_decoder():
    from ramnet.ops.ram import step

    assert step.default_layout(torch.float32) == step.DEFAULT_LAYOUT == "dense"
    assert step.default_layout(torch.float64) == "torch"  # the Triton decoders compute in fp32
    with pytest.raises(ValueError, match="layout"):
        ram_decode_step(*(torch.zeros(1, 1, 4, device=DEVICE) for _ in range(3)),
                        RAMState.empty(1, 1, 4, 4, dtype=torch.float32, device=DEVICE),
                        decode_spec(1, 4, num_partitions=1, topk=1, device=DEVICE), layout="nope")


def test_the_dense_layouts_warps_shrink_as_the_batch_grows_and_can_be_fixed(monkeypatch):
    # Few (sequence, head) rows: several warps per program shorten each step's chain; many rows: one warp each
    # keeps the GPU busy (step.DENSE_WARPS_BY_ROWS says what was measured). DENSE_WARPS fixes them (the bench).
    from ramnet.ops.ram import step

    assert [step.dense_warps(rows) for rows in (1, 16, 64, 65, 256, 512, 513, 4096)] == [4, 4, 4, 2, 2, 2, 1, 1]
    monkeypatch.setattr(step, "DENSE_WARPS", 8)
    assert step.dense_warps(4096) == 8
    assert step.fused_step_constants(20, 5, 8, 64, True, warps=1)["num_warps"] == 1
    assert step.fused_step_constants(20, 5, 8, 64, True)["num_warps"] == 8  # sized by the [M, 2] tile


@pytest.mark.parametrize("num_partitions, d_p, topk", [(3, 4, 5), (5, 4, 8)])
def test_the_beam_and_dense_decoders_give_the_same_bits(num_partitions, d_p, topk):
    """The fused layout (beam search, log weights summed from partition 0 at the winners' digits) and the dense
    one (every slot scored, the same sums) must agree bit for bit on random inputs, not only to a tolerance:
    a store's step (ramnet/states) decodes with one and the dense state may step with the other, and a bf16
    model's greedy tokens drift apart on a last-bit difference."""
    gen = torch.Generator().manual_seed(num_partitions * 10 + topk)
    batch, heads, d_v, d_k, slots = 2, 3, 8, num_partitions * d_p, d_p**num_partitions
    q, k = (torch.randn(batch, heads, d_k, generator=gen) * 2 for _ in range(2))
    v = torch.randn(batch, heads, d_v, generator=gen)
    spec = decode_spec(heads, d_k, num_partitions=num_partitions, topk=topk, gamma=torch.tensor([1.0, 0.5, 2.0]),
                       cape=torch.tensor([True, False, True]), tau=0.7, device=DEVICE)
    start = RAMState(torch.randn(batch, heads, slots, d_v, generator=gen),
                     torch.rand(batch, heads, slots, generator=gen) + 0.1, torch.tensor([3, 5000]))
    outs = []
    for layout in ("fused", "dense"):
        state = RAMState(*(x.clone().to(DEVICE) for x in start))
        o = ram_decode_step(*(x.to(DEVICE) for x in (q, k, v)), state, spec, layout=layout)
        outs.append((o, state.S, state.z))
    for beam, dense in zip(*outs):
        assert torch.equal(beam, dense)
