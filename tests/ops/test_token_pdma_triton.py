"""The token-by-token PDMA kernels (``ops/pdma/token_triton.py``) against the torch reference
``chunk_pdma`` (the same recurrence) on hand-made tokens: outputs, final states and every gradient,
with and without an initial state, packed sequences, K = 1 and 8, d_v over several slices. On CPU the
kernels run under Triton's interpreter: the shapes stay small."""

import pytest
import torch

from ramnet.ops.pdma.chunk import chunk_pdma
from test_chunk_pdma import _tokens
from test_chunk_pdma_triton import DEVICE, TOKEN_CONFIGS, _assert_outputs_close, _run
from triton_skip import needs_triton

pytestmark = needs_triton


def _args(config, with_state, final):
    batch, seq_len, heads, topk, slots, d_v, gamma, cu, _ = config
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
    from ramnet.ops.pdma import proxy_decay
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
