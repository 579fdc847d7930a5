"""The chunked PDMA kernels (``ops/pdma/chunk_triton.py``) against their torch reference
``chunk_pdma`` on hand-made tokens, and the Triton path's choice between them and the slot-sorted
kernels. On CPU the kernels run under Triton's interpreter: the shapes stay small."""

from types import SimpleNamespace

import pytest
import torch

from ramnet.ops import RAMState, ram_attention
from ramnet.ops.pdma import proxy_decay
from ramnet.ops.pdma.chunk import chunk_pdma
from ramnet.ops.ram import triton as triton_path
from ramnet.ops.ram.spec import build_spec
from test_chunk_pdma import _tokens
from triton_skip import needs_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = needs_triton

TOKEN_CONFIGS = [
    # batch, T, heads, K, M, d_v, gamma per head, cu_seqlens, slices (d_v split over programs)
    (2, 29, 3, 3, 6, 4, [0.0, 2.0, 300.0], None, 1),  # decays of exactly 0, K padded to 4
    (2, 40, 2, 8, 64, 37, [1.0, 4.0], None, 3),  # K = 8, d_v 37 over 3 slices of 16 columns
    (1, 21, 3, 1, 4, 20, [1.0, 0.5, 1.0], [0, 0, 5, 21], 2),  # K = 1, packed with an empty sequence
]


def _run(pdma, tokens, gamma, state, final, cu_seqlens, slots):
    """Output, final state and the gradients of a fixed loss w.r.t. every float input."""
    write_idx, write_w, read_idx, read_w, v = (x.detach().to(DEVICE) for x in tokens)
    leaves = [x.requires_grad_() for x in (write_w, read_w, v)]
    if state is not None:
        state = tuple(x.detach().to(DEVICE).requires_grad_() for x in state)
        leaves += list(state)
    decay = proxy_decay(write_w, gamma.to(DEVICE)[:, None], 1e-2)
    o, fin = pdma(write_idx, write_w, decay, read_idx, read_w, v, memory_slots=slots, eps=1e-6,
                  initial_state=state, output_final_state=final, cu_seqlens=cu_seqlens)
    loss = (o * torch.linspace(-1, 1, o.shape[-1], device=DEVICE)).sum()
    outputs = [o]
    if final:
        loss = loss + (fin[0] * 0.3).sum() + fin[1].sum()
        outputs += list(fin)
    return [x.detach().cpu() for x in (*outputs, *torch.autograd.grad(loss, leaves))]


@pytest.mark.parametrize("config", TOKEN_CONFIGS, ids=["zero-decays", "k8-slices", "k1-packed"])
@pytest.mark.parametrize("with_state,final", [(False, False), (True, True), (True, False)])
def test_kernels_match_reference(config, with_state, final):
    from ramnet.ops.pdma import chunk_triton

    batch, seq_len, heads, topk, slots, d_v, gamma, cu, slices = config
    write_idx, write_w, read_idx, read_w, v, state, gamma = _tokens(1, batch, seq_len, heads, topk, slots, d_v, gamma,
                                                                   dtype=torch.float32)
    cu_seqlens = None if cu is None else torch.tensor(cu, device=DEVICE)
    if cu is not None:
        state = tuple(x.expand(len(cu) - 1, *x.shape[1:]).contiguous() for x in state)
    assert chunk_triton.launch_shape((len(cu) - 1 if cu else batch) * heads, d_v)[1] == slices
    args = ((write_idx, write_w, read_idx, read_w, v), gamma, state if with_state else None, final, cu_seqlens, slots)
    got = _run(chunk_triton.chunk_pdma_triton, *args)
    want = _run(chunk_pdma, *args)
    assert got[0].dtype == torch.float32 and len(got) == len(want)
    _assert_outputs_close(got, want, with_state, final)


def _output_names(with_state, final):
    return ["o", *(["S", "z"] if final else []), "grad write_w", "grad read_w", "grad v",
            *(["grad S0", "grad z0"] if with_state else [])]


def _assert_outputs_close(got, want, with_state, final):
    """Every output and gradient at once, so that a failure names all that are off (on a GPU, which
    ones are wrong says where in the kernels to look)."""
    failures = []
    for name, a, b in zip(_output_names(with_state, final), got, want):
        # fp32 sums that cancel (gamma 300's decay gradients reach 47 and sum to 5e-5 in places): the
        # absolute error is fp32's at the tensor's scale, not at the entry's.
        atol = max(1e-5, 2e-6 * b.abs().max().item())
        if not torch.allclose(a, b, rtol=1e-4, atol=atol):
            bad = ((a - b).abs() > atol + 1e-4 * b.abs()).float().mean().item()
            failures.append(f"{name}: max error {(a - b).abs().max().item():.3g} at scale {b.abs().max().item():.3g}, "
                            f"{bad:.1%} of entries off")
    assert not failures, "; ".join(failures)


# Launch choices that must not change the result (on the CPU the interpreter ignores the first and
# already computes the selections in fp32).
LAUNCH_VARIANTS = {"4 warps": ("NUM_WARPS", 4), "ieee products": ("DOT_PRECISION", "ieee"),
                   "one slice": ("TARGET_PROGRAMS", 1), "fp32 selections": ("interpreting", lambda: True)}


@pytest.mark.skipif(DEVICE != "cuda", reason="launch choices that only a GPU compiles differently")
@pytest.mark.parametrize("variant", list(LAUNCH_VARIANTS))
def test_k8_slices_at_every_launch_choice(monkeypatch, variant):
    """The K = 8, three-slice case under each launch choice of ``chunk_triton``: warps, the precision
    of the products with v, slices, and the 0/1 selection products in fp32 instead of three bf16
    parts."""
    from ramnet.ops.pdma import chunk_triton

    monkeypatch.setattr(chunk_triton, *LAUNCH_VARIANTS[variant])
    batch, seq_len, heads, topk, slots, d_v, gamma, cu, _ = TOKEN_CONFIGS[1]
    write_idx, write_w, read_idx, read_w, v, state, gamma = _tokens(1, batch, seq_len, heads, topk, slots, d_v, gamma,
                                                                   dtype=torch.float32)
    args = ((write_idx, write_w, read_idx, read_w, v), gamma, state, True, None, slots)
    _assert_outputs_close(_run(chunk_triton.chunk_pdma_triton, *args), _run(chunk_pdma, *args), True, True)


def test_refuses_topk_beyond_the_kernels():
    from ramnet.ops.pdma.chunk_triton import chunk_pdma_triton

    tokens = _tokens(0, 1, 3, 1, 9, 16, 2, [1.0], dtype=torch.float32)
    with pytest.raises(ValueError, match="K <= 8"):
        chunk_pdma_triton(tokens[0], tokens[1], tokens[1], tokens[2], tokens[3], tokens[4], memory_slots=16, eps=1e-6)


def _op(q, k, v, kw, mode):
    q, k, v = (x.detach().to(DEVICE).requires_grad_() for x in (q, k, v))
    o, _ = ram_attention(q, k, v, mode=mode, **kw)
    grads = torch.autograd.grad((o.float() * torch.linspace(-1, 1, o.shape[-1], device=DEVICE)).sum(), [q, k, v])
    return [x.detach().double().cpu() for x in (o, *grads)]


@pytest.mark.parametrize("seq_len,num_partitions,d_p,kernels", [(40, 2, 3, "chunked"), (6, 2, 6, "sorted"),
                                                                (6, 1, 4, "chunked")])
def test_dispatch_by_table_size(monkeypatch, seq_len, num_partitions, d_p, kernels):
    """The chunked kernels while the state table has no more rows than the call has write events
    (M = 9 at T = 40; M = 4 at T = 6), the slot-sorted ones beyond (M = 36 at T = 6): each is
    taken, and agrees with the parallel path (fp64 inputs, computed in fp32)."""
    from ramnet.ops.pdma import chunk_triton, triton as sorted_triton

    monkeypatch.setattr(triton_path, "CHUNKED_BY_DEFAULT_ON_CUDA", True)  # the size rule alone, also on a GPU
    calls = []
    for module, name in ((chunk_triton, "chunk_pdma_triton"), (sorted_triton, "segment_pdma_triton")):
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    gen = torch.Generator().manual_seed(seq_len)
    d_k = num_partitions * d_p
    q, k = (torch.randn(2, seq_len, 2, d_k, generator=gen, dtype=torch.float64) * 1.5 for _ in "qk")
    v = torch.randn(2, seq_len, 2, 5, generator=gen, dtype=torch.float64)
    kw = dict(num_partitions=num_partitions, topk=2, gamma=torch.tensor([0.5, 3.0]), cape=torch.tensor([True, False]))
    assert triton_path.pdma_kernels_for(q, build_spec(2, d_k, **kw), None) == kernels
    got = _op(q, k, v, kw, "triton")
    assert calls == ["chunk_pdma_triton" if kernels == "chunked" else "segment_pdma_triton"]
    for i, (a, b) in enumerate(zip(got, _op(q, k, v, kw, "parallel"))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"output {i}: {m}")


def test_huge_memory_and_large_topk_take_the_sorted_kernels():
    q = torch.zeros(1, 4096, 2, 124)
    assert triton_path.pdma_kernels_for(q, build_spec(2, 124, num_partitions=31, topk=3), None) == "sorted"
    q = torch.zeros(1, 4096, 2, 12)
    assert triton_path.pdma_kernels_for(q, build_spec(2, 12, num_partitions=2, topk=8), None) == "chunked"
    assert triton_path.pdma_kernels_for(q, build_spec(2, 12, num_partitions=2, topk=9), None) == "sorted"
    with triton_path.pdma_kernels("chunked"):
        assert triton_path.pdma_kernels_for(q, build_spec(2, 12, num_partitions=2, topk=9), None) == "chunked"
    with pytest.raises(ValueError, match="kind must be"):
        with triton_path.pdma_kernels("fast"):
            pass


def test_state_carries_across_calls():
    """Two chunked calls, the second from the first's final state, equal one call over both."""
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(1, 37, 2, 6, generator=gen) * 1.5 for _ in "qk")
    v = torch.randn(1, 37, 2, 4, generator=gen)
    kw = dict(num_partitions=2, topk=3, cape=torch.tensor([True, False]))
    q, k, v = (x.to(DEVICE) for x in (q, k, v))
    with triton_path.pdma_kernels("chunked"):
        whole, final = ram_attention(q, k, v, mode="triton", output_final_state=True, **kw)
        first, state = ram_attention(q[:, :20], k[:, :20], v[:, :20], mode="triton", output_final_state=True, **kw)
        second, state = ram_attention(q[:, 20:], k[:, 20:], v[:, 20:], mode="triton", initial_state=state,
                                      output_final_state=True, **kw)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-5, atol=1e-6)
    for a, b in zip(state, final):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert isinstance(state, RAMState)


def test_cuda_keeps_the_sorted_kernels_until_the_chunked_ones_have_run_there(monkeypatch):
    """What `pdma_kernels_for` reads of q, for a CUDA tensor of a shape the chunked kernels would take."""
    cuda_q = SimpleNamespace(shape=(1, 4096, 2, 12), is_cuda=True)
    spec = build_spec(2, 12, num_partitions=2, topk=8)
    assert triton_path.pdma_kernels_for(cuda_q, spec, None) == "sorted"
    monkeypatch.setattr(triton_path, "CHUNKED_BY_DEFAULT_ON_CUDA", True)
    assert triton_path.pdma_kernels_for(cuda_q, spec, None) == "chunked"
