"""DeltaRuleMemory, the hybrid's DeltaNet fast-weight memory: the paper's feature map (SiLU before the
L2 norm on q and k, SiLU on v), the same in ``run``, in ``read`` and on the fla-kernel branch."""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from ramnet.layers import memories
from ramnet.layers.memories import DeltaRuleMemory

HEADS, D_K, D_V = 2, 5, 3


def tokens(batch=2, seq_len=7, dtype=torch.float64, seed=0, d_k=D_K, d_v=D_V):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, seq_len, HEADS, d_k, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(batch, seq_len, HEADS, d_v, generator=g, dtype=dtype)
    beta = torch.rand(batch, seq_len, HEADS, generator=g, dtype=dtype)
    return q, k, v, beta


def reference(q, k, v, beta, act):
    """The delta rule written out for one (batch, head) at a time, on act-mapped inputs."""
    batch, seq_len, heads, d_k = q.shape
    d_v = v.shape[-1]
    o = torch.zeros(batch, seq_len, heads, d_v, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            S = torch.zeros(d_k, d_v, dtype=torch.float64)
            for t in range(seq_len):
                key = act(k[b, t, h]) / act(k[b, t, h]).norm()
                S = S + torch.outer(key, beta[b, t, h] * (act(v[b, t, h]) - S.T @ key))
                query = act(q[b, t, h]) / act(q[b, t, h]).norm()
                o[b, t, h] = S.T @ query / math.sqrt(d_k)
    return o


@pytest.mark.parametrize("activation, act", [("silu", F.silu), ("identity", lambda x: x)])
def test_run_is_the_delta_rule_on_the_mapped_inputs(activation, act):
    q, k, v, beta = tokens()
    o, _ = DeltaRuleMemory(HEADS, D_K, D_V, activation).run(q, k, v, beta, None, None, False)
    torch.testing.assert_close(o, reference(q, k, v, beta, act))


def test_the_default_is_the_papers_silu():
    q, k, v, beta = tokens()
    memory = DeltaRuleMemory(HEADS, D_K, D_V)
    assert memory.activation == "silu"
    torch.testing.assert_close(memory.run(q, k, v, beta, None, None, False)[0], reference(q, k, v, beta, F.silu))


@pytest.mark.parametrize("activation", ["silu", "identity"])
def test_read_maps_the_query_as_run_does(activation):
    """Reading the final state with the last query gives the last output of ``run``, whose read
    follows the last write: a read that mapped q otherwise would differ."""
    q, k, v, beta = tokens()
    memory = DeltaRuleMemory(HEADS, D_K, D_V, activation)
    o, state = memory.run(q, k, v, beta, None, None, True)
    rows = torch.arange(q.shape[0])
    torch.testing.assert_close(memory.read(q[:, -1], rows, state, rows), o[:, -1])


def stand_in_kernel(calls):
    """fla's ``chunk_delta_rule`` signature, computed with the torch rule; records its inputs."""

    def kernel(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens):
        calls.append(dict(q=q, k=k, v=v, beta=beta))
        one = lambda q, k, v, beta, S: memories.delta_rule(q, k, v, beta, scale, S)  # noqa: E731
        return memories.run_per_sequence(one, (q, k, v, beta), initial_state, cu_seqlens)

    return kernel


@pytest.mark.parametrize("packed", [False, True])
def test_the_kernel_branch_gets_the_inputs_of_the_torch_branch(monkeypatch, packed):
    q, k, v, beta = tokens()
    cu_seqlens = None
    if packed:  # two sequences of 3 and 4 tokens in one row
        q, k, v, beta = (x[:1] for x in (q, k, v, beta))
        cu_seqlens = torch.tensor([0, 3, 7])
    memory = DeltaRuleMemory(HEADS, D_K, D_V)
    expected, expected_state = memory.run(q, k, v, beta, None, cu_seqlens, True)
    calls = []
    monkeypatch.setattr(memories, "_delta_rule_kernel", lambda like: stand_in_kernel(calls))
    o, state = memory.run(q, k, v, beta, None, cu_seqlens, True)
    (seen,) = calls
    torch.testing.assert_close(seen["q"], F.normalize(F.silu(q), dim=-1))
    torch.testing.assert_close(seen["k"], F.normalize(F.silu(k), dim=-1))
    torch.testing.assert_close(seen["v"], F.silu(v))
    torch.testing.assert_close(o, expected)
    torch.testing.assert_close(state.S, expected_state.S)


def test_bad_activation_is_refused():
    with pytest.raises(ValueError, match=r"activation must be one of \['silu', 'identity'\], got 'relu'"):
        DeltaRuleMemory(HEADS, D_K, D_V, "relu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="needs flash-linear-attention")
def test_fla_kernel_matches_the_torch_rule_on_cuda():
    """The real ``chunk_delta_rule`` against the torch rule, both on the mapped inputs (bf16, as in
    training; 130 tokens: past fla's chunk of 64 and not a multiple of it; head widths as fla's tests)."""
    q, k, v, beta = (x.cuda().bfloat16() for x in tokens(seq_len=130, dtype=torch.float32, d_k=64, d_v=32))
    memory = DeltaRuleMemory(HEADS, 64, 32)
    assert memories._delta_rule_kernel(q) is not None
    o, state = memory.run(q, k, v, beta, None, None, True)
    expected = reference(*(x.double().cpu() for x in (q, k, v, beta)), F.silu)
    torch.testing.assert_close(o.double().cpu(), expected, atol=3e-2, rtol=3e-2)
    assert state.S.shape == (2, HEADS, 64, 32)
