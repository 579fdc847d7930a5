"""The token-by-token PDMA kernels (``ops/pdma/token_triton.py``) against the torch reference
``chunk_pdma`` (the same recurrence) on hand-made tokens: outputs, final states and every gradient,
with and without an initial state, packed sequences, K = 1 and 8, d_v over several slices; and the
Triton path's choice between them and the slot-sorted kernels. On CPU the kernels run under Triton's
interpreter: the shapes stay small."""

import pytest
import torch

from ramnet.ops import RAMState, ram_attention
from ramnet.ops.pdma import proxy_decay
from ramnet.ops.pdma.chunk import chunk_pdma
from ramnet.ops.ram import triton as triton_path
from test_chunk_pdma import _tokens
from triton_skip import needs_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = needs_triton

TOKEN_CONFIGS = [
    # batch, T, heads, K, M, d_v, gamma per head, cu_seqlens
    (2, 29, 3, 3, 6, 4, [0.0, 2.0, 300.0], None),  # decays of exactly 0, K padded to 4
    (2, 40, 2, 8, 64, 37, [1.0, 4.0], None),  # K = 8, d_v 37 over slices (two of 32 columns by default)
    (1, 21, 3, 1, 4, 20, [1.0, 0.5, 1.0], [0, 0, 5, 21]),  # K = 1, packed with an empty sequence
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


def _args(config, with_state, final):
    batch, seq_len, heads, topk, slots, d_v, gamma, cu = config
    write_idx, write_w, read_idx, read_w, v, state, gamma = _tokens(1, batch, seq_len, heads, topk, slots, d_v, gamma,
                                                                   dtype=torch.float32)
    cu_seqlens = None if cu is None else torch.tensor(cu, device=DEVICE)
    if cu is not None:
        state = tuple(x.expand(len(cu) - 1, *x.shape[1:]).contiguous() for x in state)
    return (write_idx, write_w, read_idx, read_w, v), gamma, state if with_state else None, final, cu_seqlens, slots


@pytest.mark.parametrize("config", TOKEN_CONFIGS, ids=["zero-decays", "k8-slices", "k1-packed"])
@pytest.mark.parametrize("with_state,final", [(False, False), (True, True), (True, False)])
def test_kernels_match_reference(config, with_state, final):
    from ramnet.ops.pdma.token_triton import token_pdma_triton

    args = _args(config, with_state, final)
    got = _run(token_pdma_triton, *args)
    want = _run(chunk_pdma, *args)
    assert got[0].dtype == torch.float32 and len(got) == len(want)
    _assert_outputs_close(got, want, with_state, final)


def test_reads_of_the_slots_a_token_writes_see_the_write():
    """M = 6 and K = 3 with every read at the token's own write slots (read_idx = write_idx): every
    read takes the row the token has just written, from registers, and its adjoint reaches the write."""
    from ramnet.ops.pdma.token_triton import token_pdma_triton

    (write_idx, write_w, _, read_w, v), gamma, state, final, cu, slots = _args(TOKEN_CONFIGS[0], True, True)
    args = ((write_idx, write_w, write_idx.flip(-1), read_w, v), gamma, state, final, cu, slots)
    _assert_outputs_close(_run(token_pdma_triton, *args), _run(chunk_pdma, *args), True, True)


# Launch choices that must not change the result (d_v 37: 3 slices of 16, 2 of 32 or one of 64).
LAUNCH_VARIANTS = {"width 16": dict(WIDTH=16), "width 64": dict(WIDTH=64), "2 warps": dict(NUM_WARPS=2),
                   "4 warps, width 16": dict(NUM_WARPS=4, WIDTH=16)}


@pytest.mark.parametrize("variant", list(LAUNCH_VARIANTS))
def test_every_launch_choice(monkeypatch, variant):
    """The K = 8 case under each launch choice of ``token_triton`` (warps only change compiled code:
    on the CPU the interpreter runs them alike)."""
    from ramnet.ops.pdma import token_triton

    for name, value in LAUNCH_VARIANTS[variant].items():
        monkeypatch.setattr(token_triton, name, value)
    args = _args(TOKEN_CONFIGS[1], True, True)
    _assert_outputs_close(_run(token_triton.token_pdma_triton, *args), _run(chunk_pdma, *args), True, True)


def test_launch_shape_slices_d_v():
    from ramnet.ops.pdma import token_triton

    assert token_triton.launch_shape(64) == (token_triton.WIDTH, 64 // token_triton.WIDTH)
    assert token_triton.launch_shape(37)[0] * token_triton.launch_shape(37)[1] >= 37
    assert token_triton.launch_shape(5) == (8, 1)


def test_backward_runs_twice():
    """The backward rolls its tables back in place: it works on copies, so a retained graph gives the
    same gradients twice."""
    from ramnet.ops.pdma.token_triton import token_pdma_triton

    (write_idx, write_w, read_idx, read_w, v), gamma, state, _, _, slots = _args(TOKEN_CONFIGS[1], True, True)
    leaves = [x.detach().to(DEVICE).requires_grad_() for x in (write_w, read_w, v, *state)]
    write_w, read_w, v, S0, z0 = leaves
    decay = proxy_decay(write_w, gamma.to(DEVICE)[:, None], 1e-2)
    o, (S, z) = token_pdma_triton(write_idx.to(DEVICE), write_w, decay, read_idx.to(DEVICE), read_w, v,
                                  memory_slots=slots, eps=1e-6, initial_state=(S0, z0), output_final_state=True)
    loss = o.sum() + S.sum() + z.sum()
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_refuses_topk_beyond_the_kernels():
    from ramnet.ops.pdma.token_triton import token_pdma_triton

    tokens = _tokens(0, 1, 3, 1, 9, 16, 2, [1.0], dtype=torch.float32)
    with pytest.raises(ValueError, match="K <= 8"):
        token_pdma_triton(tokens[0], tokens[1], tokens[1], tokens[2], tokens[3], tokens[4], memory_slots=16, eps=1e-6)


def _op(q, k, v, kw, mode):
    q, k, v = (x.detach().to(DEVICE).requires_grad_() for x in (q, k, v))
    o, _ = ram_attention(q, k, v, mode=mode, **kw)
    grads = torch.autograd.grad((o.float() * torch.linspace(-1, 1, o.shape[-1], device=DEVICE)).sum(), [q, k, v])
    return [x.detach().double().cpu() for x in (o, *grads)]


@pytest.mark.parametrize("kernels", ["auto", "token", "sorted"])
def test_dispatch(monkeypatch, kernels):
    """``pdma_kernels`` picks the family the Triton path runs ("auto": the slot-sorted kernels), and each
    agrees with the parallel path (fp64 inputs, computed in fp32)."""
    from ramnet.ops.pdma import token_triton, triton as sorted_triton

    calls = []
    for module, name in ((token_triton, "token_pdma_triton"), (sorted_triton, "segment_pdma_triton")):
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 17, 2, 6, generator=gen, dtype=torch.float64) * 1.5 for _ in "qk")
    v = torch.randn(2, 17, 2, 5, generator=gen, dtype=torch.float64)
    kw = dict(num_partitions=2, topk=2, gamma=torch.tensor([0.5, 3.0]), cape=torch.tensor([True, False]))
    with triton_path.pdma_kernels(kernels):
        assert triton_path.pdma_kernels_for() == ("sorted" if kernels == "auto" else kernels)
        got = _op(q, k, v, kw, "triton")
    assert calls == ["token_pdma_triton" if kernels == "token" else "segment_pdma_triton"]
    for i, (a, b) in enumerate(zip(got, _op(q, k, v, kw, "parallel"))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"output {i}: {m}")


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="kind must be"):
        with triton_path.pdma_kernels("chunked"):
            pass


def test_state_carries_across_calls():
    """Two token-kernel calls, the second from the first's final state, equal one call over both."""
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(1, 37, 2, 6, generator=gen) * 1.5 for _ in "qk")
    v = torch.randn(1, 37, 2, 4, generator=gen)
    kw = dict(num_partitions=2, topk=3, cape=torch.tensor([True, False]))
    q, k, v = (x.to(DEVICE) for x in (q, k, v))
    with triton_path.pdma_kernels("token"):
        whole, final = ram_attention(q, k, v, mode="triton", output_final_state=True, **kw)
        first, state = ram_attention(q[:, :20], k[:, :20], v[:, :20], mode="triton", output_final_state=True, **kw)
        second, state = ram_attention(q[:, 20:], k[:, 20:], v[:, 20:], mode="triton", initial_state=state,
                                      output_final_state=True, **kw)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-5, atol=1e-6)
    for a, b in zip(state, final):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert isinstance(state, RAMState)
