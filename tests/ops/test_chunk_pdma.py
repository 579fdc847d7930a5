"""The chunked PDMA's torch reference (``ops/pdma/chunk.py``) against the other paths: through the
whole op against ``naive`` (fp64) and ``parallel`` (fp32), and on hand-made tokens against the
token-by-token step, where decays of exactly 0 can be placed."""

import pytest
import torch

from ramnet.ops import RAMState, ram_attention
from ramnet.ops.pdma import proxy_decay
from ramnet.ops.pdma.chunk import chunk_pdma
from ramnet.ops.ram.table import table_forward
from ramnet.ops.ram.recurrent import pdma_step
from ramnet.ops.ram.spec import build_spec

CONFIGS = [
    # seed, batch, T, heads, U, d_p, d_v, K, gamma per head, cape per head, initial state, cu_seqlens
    (0, 2, 37, 3, 2, 3, 5, 4, [0.0, 1.0, 50.0], [True, False, True], True, None),
    (1, 1, 50, 2, 1, 4, 3, 1, [0.5, 2.0], [False, True], False, [0, 0, 17, 17, 50]),
    (2, 2, 20, 2, 5, 4, 7, 8, [1.0, 16.0], [True, False], True, None),
    (3, 1, 33, 2, 3, 2, 6, 8, [4.0, 0.0], [False, False], True, [0, 16, 33]),
    (4, 3, 16, 1, 2, 4, 16, 2, [1000.0], [True], False, None),
    (5, 1, 45, 2, 4, 3, 9, 5, [0.0, 1.0], [True, True], True, [0, 45]),
]


def _op_inputs(config, dtype):
    seed, batch, seq_len, heads, num_partitions, d_p, d_v, topk, gamma, cape, with_state, cu = config
    gen = torch.Generator().manual_seed(seed)
    d_k = num_partitions * d_p
    q, k = (torch.randn(batch, seq_len, heads, d_k, generator=gen, dtype=dtype) * 1.5 for _ in "qk")
    v = torch.randn(batch, seq_len, heads, d_v, generator=gen, dtype=dtype)
    cu_seqlens = None if cu is None else torch.tensor(cu)
    num_seqs = batch if cu is None else len(cu) - 1
    kw = dict(num_partitions=num_partitions, topk=topk, gamma=torch.tensor(gamma, dtype=dtype),
              cape=torch.tensor(cape), tau=0.8)
    state = None
    if with_state:
        slots = d_p**num_partitions
        state = RAMState(torch.randn(num_seqs, heads, slots, d_v, generator=gen, dtype=dtype),
                         torch.rand(num_seqs, heads, slots, generator=gen, dtype=dtype) + 0.05,
                         torch.randint(0, 50, (num_seqs,), generator=gen))
    return (q, k, v), kw, state, cu_seqlens


def _outputs_and_grads(run, inputs, state):
    """Output, final state and the gradients of a fixed loss w.r.t. q, k, v (and the state)."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    if state is not None:
        state = RAMState(state.S.detach().requires_grad_(), state.z.detach().requires_grad_(), state.offset)
        leaves += [state.S, state.z]
    o, final = run(*leaves[:3], state)
    loss = (o * torch.linspace(-1, 1, o.shape[-1], dtype=o.dtype)).sum() + (final.S * 0.3).sum() + final.z.sum()
    return [o, final.S, final.z, *torch.autograd.grad(loss, leaves)], final.offset


@pytest.mark.parametrize("dtype,reference,tol", [(torch.float64, "naive", 1e-10), (torch.float32, "parallel", 1e-4)])
@pytest.mark.parametrize("config", CONFIGS, ids=[f"cfg{c[0]}" for c in CONFIGS])
def test_matches_op_paths(config, dtype, reference, tol):
    inputs, kw, state, cu_seqlens = _op_inputs(config, dtype)
    heads, d_k = inputs[0].shape[2:]
    spec = build_spec(heads, d_k, dtype=dtype, **kw)

    def chunked(q, k, v, s):
        return table_forward(q, k, v, spec, s, True, cu_seqlens, use_triton=False)

    def op(q, k, v, s):
        return ram_attention(q, k, v, initial_state=s, output_final_state=True, cu_seqlens=cu_seqlens,
                             mode=reference, **kw)

    got, got_offset = _outputs_and_grads(chunked, inputs, state)
    want, want_offset = _outputs_and_grads(op, inputs, state)
    assert torch.equal(got_offset, want_offset)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * 0.1, msg=lambda m: f"output {i}: {m}")


def _tokens(seed, batch, seq_len, heads, topk, slots, d_v, gamma, dtype=torch.float64):
    """Random decoded tokens with some write weights exactly 1 (a decay of exactly 0 wherever
    gamma > 0), distinct slots per token."""
    gen = torch.Generator().manual_seed(seed)

    def distinct_slots():
        return torch.rand(batch, seq_len, heads, slots, generator=gen).argsort(-1)[..., :topk]

    write_w = torch.rand(batch, seq_len, heads, topk, generator=gen, dtype=dtype)
    write_w[torch.rand(write_w.shape, generator=gen) < 0.2] = 1.0
    read_w = torch.rand(batch, seq_len, heads, topk, generator=gen, dtype=dtype)
    v = torch.randn(batch, seq_len, heads, d_v, generator=gen, dtype=dtype)
    state = (torch.randn(batch, heads, slots, d_v, generator=gen, dtype=dtype),
             torch.rand(batch, heads, slots, generator=gen, dtype=dtype) + 0.05)
    return distinct_slots(), write_w, distinct_slots(), read_w, v, state, torch.tensor(gamma, dtype=dtype)


def _step_by_step(write_idx, write_w, decay, read_idx, read_w, v, state, eps):
    S, z = state
    outputs = []
    for t in range(v.shape[1]):
        S, z, o = pdma_step(S, z, write_idx[:, t], write_w[:, t], decay[:, t], v[:, t],
                            read_idx[:, t], read_w[:, t], eps, inplace=False)
        outputs.append(o)
    return torch.stack(outputs, 1), (S, z)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
def test_zero_decays_against_steps(chunk_size):
    """Decays of exactly 0 next to gamma 0 (decay 1) and a large gamma: values and gradients of
    every float input, for chunk sizes that cut the sequence differently."""
    write_idx, write_w, read_idx, read_w, v, state, gamma = _tokens(0, 2, 29, 3, 3, 6, 4, [0.0, 2.0, 300.0])
    leaves = [x.requires_grad_() for x in (write_w, read_w, v, *state)]

    def loss_and_grads(run):
        decay = proxy_decay(write_w, gamma[:, None], 1e-2)
        o, (S, z) = run(write_idx, write_w, decay, read_idx, read_w, v, state)
        loss = (o * torch.linspace(-1, 1, o.shape[-1], dtype=o.dtype)).sum() + (S * 0.3).sum() + z.sum()
        return [o, S, z, *torch.autograd.grad(loss, leaves)]

    assert bool((proxy_decay(write_w, gamma[:, None], 1e-2) == 0).any())
    got = loss_and_grads(lambda *x: chunk_pdma(*x[:6], memory_slots=6, eps=1e-6, initial_state=x[6],
                                               output_final_state=True, chunk_size=chunk_size))
    want = loss_and_grads(lambda *x: _step_by_step(*x, eps=1e-6))
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"output {i}: {m}")
