"""One top-K tie rule on every path and kernel (issue 15, item 6, ``ramnet/ops/address/beam.py``):
the K largest scores ``sum_u x_u[m_u]`` (tau log rho up to a constant of the row), and among equal
scores the lower slot index (before CAPE) first.

Exact ties come from equal logits inside a partition (every address that differs only in those
entries has the same score) or from sums of different logits that are equal (frequent on bf16
inputs). The Triton kernels run under the interpreter on CPU.
"""

import itertools

import pytest
import torch

from ramnet.ops import RAMState, address_decode, ram_attention
from ramnet.ops.address import beam_topk, dense_topk_address
from ramnet.ops.triton_support import triton_runs_on

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_runs_on(DEVICE), reason="Triton cannot run here")


def rule_topk(x: torch.Tensor, num_partitions: int, topk: int, tau: float = 1.0) -> list[list[int]]:
    """The tie rule by brute force over all M slots, in Python (rows of ``x [N, d_k]``): scores
    summed from the first partition in x's dtype, sorted by (-score, slot)."""
    d_p = x.shape[-1] // num_partitions
    logp = x.unflatten(-1, (num_partitions, d_p))  # the scores' terms: the same order for every tau
    out = []
    for row in logp:
        scores = []
        for digits in itertools.product(range(d_p), repeat=num_partitions):
            s = row[0, digits[0]]
            for u in range(1, num_partitions):
                s = s + row[u, digits[u]]
            slot = sum(d * d_p ** (num_partitions - 1 - u) for u, d in enumerate(digits))
            scores.append((-float(s), slot))
        out.append([slot for _, slot in sorted(scores)[:topk]])
    return out


def tied_inputs(rows, num_partitions, d_p, seed, dtype=torch.float64):
    """Logits with equal entries inside partitions: each partition draws its d_p entries from a few
    generic values of its own, so rows tie exactly on every path (and only through equal entries:
    sums of different entries never coincide, in any implementation's rounding)."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(rows, num_partitions, max(1, d_p // 2), generator=gen, dtype=torch.float64)
    pick = torch.randint(0, pool.shape[-1], (rows, num_partitions, d_p), generator=gen)
    return pool.gather(-1, pick).reshape(rows, num_partitions * d_p).to(dtype)


def grid_inputs(rows, num_partitions, d_p, seed, dtype=torch.float64):
    """Logits on a coarse bf16-exact grid (quarters): equal entries, and sums of different entries
    that are equal (exactly, in fp32 and fp64 alike)."""
    gen = torch.Generator().manual_seed(seed)
    return ((torch.randn(rows, num_partitions * d_p, generator=gen) * 4).round() / 4).to(dtype)


INPUTS = {"equal entries": tied_inputs, "grid": grid_inputs}

# (U, d_p, K): K inside a tie group, K > d_p (beams grow), K = M.
CASES = [(1, 6, 3), (2, 3, 4), (2, 4, 5), (3, 3, 7), (3, 2, 8), (4, 3, 6)]


def test_all_slots_equal_gives_the_lowest_slots_in_order():
    x = torch.zeros(3, 3 * 4, dtype=torch.float64)
    index, weight = address_decode(x, num_partitions=3, topk=5)
    assert index.tolist() == [[0, 1, 2, 3, 4]] * 3
    torch.testing.assert_close(weight, torch.full_like(weight, 1 / 64))


def test_equal_partition_entries_pick_lower_slots():
    # Partition 0 ties entries 0 and 1, partition 1 ties 1 and 2: slots 1, 2, 4, 5 have the top score.
    x = torch.tensor([[1.0, 1.0, 0.0, 0.0, 2.0, 2.0]], dtype=torch.float64)
    assert beam_topk(x, 2, 3, 1.0)[0].tolist() == [[1, 2, 4]]
    dense = dense_topk_address(x, 2, 3, 1.0)
    assert dense[0].nonzero().flatten().tolist() == [1, 2, 4]


@pytest.mark.parametrize("num_partitions, d_p, topk", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_beam_and_dense_follow_the_rule(num_partitions, d_p, topk, dtype, kind):
    x = INPUTS[kind](40, num_partitions, d_p, seed=num_partitions * 10 + d_p, dtype=dtype)
    want = rule_topk(x, num_partitions, topk)
    index, weight = beam_topk(x, num_partitions, topk, 1.0)
    assert index.tolist() == want
    dense = dense_topk_address(x, num_partitions, topk, 1.0)
    got = [sorted(row.nonzero().flatten().tolist()) for row in dense]
    assert got == [sorted(row) for row in want]


@pytest.mark.parametrize("num_partitions, d_p, topk", [(2, 4, 5), (3, 3, 7)])
def test_beam_follows_the_rule_when_traced(num_partitions, d_p, topk):
    """Traced (a compiled decoding step), the beam redoes every row without reading the device and
    keeps the tied rows' redone positions: the same slots as eagerly."""
    x = grid_inputs(40, num_partitions, d_p, seed=7)
    torch._dynamo.reset()
    traced = torch.compile(beam_topk, fullgraph=True, backend="eager")(x, num_partitions, topk, 1.0)
    torch._dynamo.reset()
    assert traced[0].tolist() == rule_topk(x, num_partitions, topk)
    torch.testing.assert_close(traced[1], beam_topk(x, num_partitions, topk, 1.0)[1])


def test_beam_reads_nothing_on_the_host_inside_a_cuda_graph_capture(monkeypatch):
    """Captured in a CUDA graph (``torch.cuda.graph``, no torch.compile), a host read of a device value
    fails the capture: the beam takes its traced branch there too, with the same slots."""
    x = grid_inputs(40, 3, 3, seed=7)
    want = rule_topk(x, 3, 7)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))  # as if on the GPU...
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)  # ...and capturing

    def no_host_read(t):
        raise AssertionError("a device value was read on the host during the capture")

    monkeypatch.setattr(torch.Tensor, "__bool__", no_host_read)
    assert beam_topk(x, 3, 7, 1.0)[0].tolist() == want


@needs_triton
@pytest.mark.parametrize("num_partitions, d_p, topk", CASES)
@pytest.mark.parametrize("with_shift", [False, True])
@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_triton_decoder_follows_the_rule(num_partitions, d_p, topk, with_shift, kind):
    from ramnet.ops.address.triton import triton_beam_topk

    x = INPUTS[kind](37, num_partitions, d_p, seed=num_partitions * 10 + d_p, dtype=torch.float32)
    memory_slots = d_p**num_partitions
    shift = torch.arange(37) * 5 if with_shift else None
    index, _ = triton_beam_topk(x.to(DEVICE), num_partitions, topk, 1.0, shift=None if shift is None else shift.to(DEVICE))
    want = torch.tensor(rule_topk(x, num_partitions, topk))
    if with_shift:
        want = torch.remainder(want - shift[:, None], memory_slots)
    assert index.cpu().tolist() == want.tolist()


_RULE_SLOT_CASES = [(2, 3, 4, False), (3, 2, 5, True), (1, 6, 3, True), (3, 3, 4, True)]


@needs_triton
@pytest.mark.parametrize("num_partitions, d_p, topk, cape, kind, layout",
                         [(*case, kind, "fused") for case in _RULE_SLOT_CASES for kind in sorted(INPUTS)]
                         # the other layouts of ram_decode_step (step.py): the dense decoder among them
                         + [(*case, "grid", layout) for case in _RULE_SLOT_CASES[1:2]
                            for layout in ("dense", "split", "separate")])
def test_fused_decode_step_writes_the_rule_slots(num_partitions, d_p, topk, cape, kind, layout):
    from ramnet.ops.ram.step import decode_spec, ram_decode_step

    batch, heads, d_v = 16, 2, 3
    memory_slots = d_p**num_partitions
    x = INPUTS[kind](2 * batch * heads, num_partitions, d_p, seed=7, dtype=torch.float32)
    k, q = x.view(2, batch, heads, -1).unbind(0)
    v = torch.randn(batch, heads, d_v, generator=torch.Generator().manual_seed(3))
    offset = torch.arange(batch) * 3
    spec = decode_spec(heads, num_partitions * d_p, num_partitions=num_partitions, topk=topk, cape=cape, device=DEVICE)
    state = RAMState.empty(batch, heads, memory_slots, d_v, dtype=torch.float32, device=DEVICE)
    state = RAMState(state.S, state.z, offset.clone().to(DEVICE))  # the step advances it in place
    torch_state = RAMState(state.S.clone(), state.z.clone(), state.offset.clone())
    o = ram_decode_step(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), state, spec, layout=layout)
    # The torch decoder, then the step kernel: the same slots written and read.
    torch_o = ram_decode_step(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), torch_state, spec, triton_decode=False)
    torch.testing.assert_close(o, torch_o, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.S, torch_state.S, rtol=1e-5, atol=1e-6)
    written = (state.z.cpu() != 1 / memory_slots)
    want = torch.tensor(rule_topk(k.reshape(batch * heads, -1), num_partitions, topk)).view(batch, heads, topk)
    if cape:
        want = torch.remainder(want - offset[:, None, None], memory_slots)
    for b, h in itertools.product(range(batch), range(heads)):
        assert written[b, h].nonzero().flatten().tolist() == sorted(want[b, h].tolist())


def _bf16_inputs(seed, batch, seq_len, heads, num_partitions, d_p, d_v):
    """q, k on a coarse bf16-exact grid (quarters), so that partitions often hold equal entries and
    rows tie at the K-th slot, and v; all in fp64."""
    gen = torch.Generator().manual_seed(seed)
    q, k = ((torch.randn(batch, seq_len, heads, num_partitions * d_p, generator=gen) * 4).round().double() / 4
            for _ in range(2))
    return q, k, torch.randn(batch, seq_len, heads, d_v, generator=gen).double()


def _has_kth_ties(x, num_partitions, topk):
    """Whether some row's K-th and (K+1)-th log-scores are equal (a tie at the cut)."""
    flat = x.reshape(-1, x.shape[-1])
    _, weights = beam_topk(flat, num_partitions, topk + 1, 1.0)
    return bool((weights[:, topk - 1] == weights[:, topk]).any())


@pytest.mark.parametrize("num_partitions, d_p, topk, cape", [(2, 4, 3, False), (3, 3, 5, True), (2, 3, 2, True)])
def test_naive_recurrent_and_parallel_agree_on_bf16_rounded_ties(num_partitions, d_p, topk, cape):
    q, k, v = _bf16_inputs(num_partitions * 100 + topk, 2, 24, 2, num_partitions, d_p, 3)
    assert _has_kth_ties(k, num_partitions, topk) and _has_kth_ties(q, num_partitions, topk)
    kw = dict(num_partitions=num_partitions, topk=topk, cape=cape, output_final_state=True)
    ref, ref_state = ram_attention(q, k, v, mode="naive", **kw)
    for mode in ("recurrent", "parallel"):
        o, state = ram_attention(q, k, v, mode=mode, **kw)
        torch.testing.assert_close(o, ref, rtol=1e-12, atol=1e-12, msg=mode)
        torch.testing.assert_close(state.S, ref_state.S, rtol=1e-12, atol=1e-12, msg=mode)


def test_fp32_paths_pick_the_fp64_slots_on_bf16_inputs():
    # The scores of bf16 inputs are exact in fp32 and fp64: the same slots, so fp32 precision.
    q, k, v = _bf16_inputs(11, 2, 20, 2, 3, 3, 4)
    assert _has_kth_ties(k, 3, 4)
    kw = dict(num_partitions=3, topk=4, cape=torch.tensor([True, False]))
    ref, _ = ram_attention(q, k, v, mode="naive", **kw)
    for mode in ("naive", "recurrent", "parallel"):
        o, _ = ram_attention(q.float(), k.float(), v.float(), mode=mode, **kw)
        torch.testing.assert_close(o.double(), ref, rtol=1e-5, atol=1e-5, msg=mode)


@needs_triton
def test_triton_path_picks_the_fp64_slots_on_bf16_inputs():
    q, k, v = _bf16_inputs(5, 1, 16, 2, 2, 4, 3)
    assert _has_kth_ties(k, 2, 3) and _has_kth_ties(q, 2, 3)
    kw = dict(num_partitions=2, topk=3, cape=torch.tensor([True, False]))
    ref, _ = ram_attention(q, k, v, mode="naive", **kw)
    o, _ = ram_attention(q.float().to(DEVICE), k.float().to(DEVICE), v.float().to(DEVICE), mode="triton", **kw)
    torch.testing.assert_close(o.double().cpu(), ref, rtol=1e-5, atol=1e-5)
    o16, _ = ram_attention(*(x.bfloat16().to(DEVICE) for x in (q, k, v)), mode="triton", **kw)
    torch.testing.assert_close(o16.double().cpu(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("tau", [1.7, 0.3, 3.0])
def test_grid_ties_pick_the_same_slots_at_any_tau(tau):
    # Found by the fuzz suite: with scores x / tau, the rounding of the division let the beam prune the
    # prefix (1, 1) for (2, 2) (x sums 1.25 = 1.25, divided: an ulp apart) whose slots 13 and 25 then tied.
    row = torch.tensor([[-1.0, 3.0, 1.25, -3.0, -1.75, 0.0, 0.75, 6.25, 2.75]], dtype=torch.float64)
    assert beam_topk(row, 3, 2, tau)[0].tolist() == rule_topk(row, 3, 2) == [[16, 13]]
    x = grid_inputs(60, 3, 3, seed=17)
    want = rule_topk(x, 3, 4)
    assert beam_topk(x, 3, 4, tau)[0].tolist() == want
    dense = dense_topk_address(x, 3, 4, tau)
    assert [sorted(r.nonzero().flatten().tolist()) for r in dense] == [sorted(r) for r in want]
    q, k, v = _bf16_inputs(3, 1, 16, 2, 3, 3, 2)
    kw = dict(num_partitions=3, topk=2, tau=tau, cape=True, output_final_state=True)
    ref, _ = ram_attention(q, k, v, mode="naive", **kw)
    for mode in ("recurrent", "parallel"):
        torch.testing.assert_close(ram_attention(q, k, v, mode=mode, **kw)[0], ref, rtol=1e-12, atol=1e-12)
