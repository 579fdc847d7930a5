"""mode="triton" (fused Triton kernels) agrees with the parallel path: outputs, final state and
gradients, with each family of PDMA kernels (token-by-token and slot-sorted, forced by ``pdma_kernels``).
On CPU the kernels run under Triton's interpreter (slow: the shapes stay tiny)."""

import pytest
import torch

from ramnet.ops import RAMState, ram_attention
from ramnet.ops.ram.triton import pdma_kernels
from triton_skip import needs_triton


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = needs_triton  # the reason names what is missing: Triton, or its interpreter on CPU

def _run(mode, q, k, v, state=None, final=True, **kw):
    q, k, v = (x.detach().to(DEVICE).requires_grad_() for x in (q, k, v))
    leaves = [q, k, v]
    if state is not None:
        state = RAMState(*(x.detach().to(DEVICE).requires_grad_() for x in state[:2]), state.offset.to(DEVICE))
        leaves += [state.S, state.z]
    o, fin = ram_attention(q, k, v, initial_state=state, output_final_state=final, mode=mode, **kw)
    loss = (o.float() * torch.linspace(-1, 1, o.shape[-1], device=DEVICE)).sum()
    outputs = [o]
    if final:
        loss = loss + (fin.S.float() * 0.3).sum() + fin.z.float().sum()
        outputs += [fin.S, fin.z]
    return [x.detach().float().cpu() for x in (*outputs, *torch.autograd.grad(loss, leaves))]


def _inputs(seed, batch, seq_len, heads, d_k, d_v, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq_len, heads, d, generator=gen).to(dtype) * s
            for d, s in ((d_k, 1.5), (d_k, 1.5), (d_v, 1.0))]


def _state(seed, num_seqs, heads, slots, d_v):
    gen = torch.Generator().manual_seed(seed)
    return RAMState(torch.randn(num_seqs, heads, slots, d_v, generator=gen),
                    torch.rand(num_seqs, heads, slots, generator=gen) + 0.05, torch.tensor([3, 40][:num_seqs]))


def _assert_close(got, want, rtol=1e-4, atol=1e-5):
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"output {i}: {m}")


KW = dict(num_partitions=2, topk=3, gamma=torch.tensor([0.0, 0.5, 2.0]), cape=torch.tensor([True, False, True]))
KERNELS = ["token", "sorted"]


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_parallel(with_state, kernels):
    q, k, v = _inputs(0, 2, 21, 3, 6, 5)
    state = _state(1, 2, 3, 9, 5) if with_state else None
    with pdma_kernels(kernels):
        got = _run("triton", q, k, v, state, **KW)
    _assert_close(got, _run("parallel", q, k, v, state, **KW))


@pytest.mark.parametrize("kernels", KERNELS)
def test_without_final_state(kernels):
    q, k, v = _inputs(2, 1, 19, 3, 6, 4)
    with pdma_kernels(kernels):
        got = _run("triton", q, k, v, final=False, **KW)
    _assert_close(got, _run("parallel", q, k, v, final=False, **KW))


@pytest.mark.parametrize("kernels", KERNELS)
def test_varlen_with_empty_sequence(kernels):
    q, k, v = _inputs(3, 1, 23, 3, 6, 4)
    cu = torch.tensor([0, 6, 6, 23], device=DEVICE)
    state = _state(4, 3, 3, 9, 4)
    state = RAMState(state.S, state.z, torch.tensor([0, 5, 11]))
    with pdma_kernels(kernels):
        got = _run("triton", q, k, v, state, cu_seqlens=cu, **KW)
    _assert_close(got, _run("parallel", q, k, v, state, cu_seqlens=cu, **KW))


def test_long_segments_cross_groups_and_chunks(monkeypatch):
    """The slot-sorted kernels, four slots for 48 tokens: every slot's segment spans many groups of
    events and several chunks, so the carries between groups of a program, between programs, and
    across several steps of the carry pass all take part."""
    from ramnet.ops.pdma import triton as pdma_triton

    monkeypatch.setattr(pdma_triton, "_chunk_size", lambda rows, events: 2 * pdma_triton.GROUP)
    monkeypatch.setattr(pdma_triton, "CARRY_GROUP", 2)
    q, k, v = _inputs(5, 1, 48, 2, 4, 3)
    kw = dict(num_partitions=1, topk=2, gamma=torch.tensor([1.0, 0.5]), cape=torch.tensor([False, True]))
    state = _state(6, 1, 2, 4, 3)
    with pdma_kernels("sorted"):
        got = _run("triton", q, k, v, state, **kw)
    _assert_close(got, _run("parallel", q, k, v, state, **kw))


@pytest.mark.parametrize("kernels", KERNELS)
def test_half_precision_inputs(kernels):
    q, k, v = _inputs(7, 1, 16, 3, 6, 4, dtype=torch.bfloat16)
    with pdma_kernels(kernels):
        got = _run("triton", q, k, v, **KW)
    want = _run("parallel", q, k, v, **KW)
    assert got[0].dtype == torch.float32 and len(got) == len(want)
    _assert_close(got, want, rtol=2e-2, atol=2e-2)
