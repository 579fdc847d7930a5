"""``run_ram_attention``: the op with a spec built once (as the layers hold one), validated like ``ram_attention``."""

import pytest
import torch

from ramnet.ops import RAMState, ram_attention
from ramnet.ops.ram import run_ram_attention
from ramnet.ops.ram.spec import build_spec

HP = dict(num_partitions=2, topk=3, gamma=0.5, cape=True)


def _inputs(batch=2, seq_len=5, heads=3, d_k=6, d_v=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, seq_len, heads, d_k, generator=g, dtype=dtype),
            torch.randn(batch, seq_len, heads, d_k, generator=g, dtype=dtype),
            torch.randn(batch, seq_len, heads, d_v, generator=g, dtype=dtype))


@pytest.mark.parametrize("mode", ["naive", "recurrent", "parallel"])
def test_same_as_ram_attention(mode):
    q, k, v = _inputs()
    spec = build_spec(3, 6, dtype=torch.float64, **HP)
    o, final = run_ram_attention(q, k, v, spec, output_final_state=True, mode=mode)
    o_ref, final_ref = ram_attention(q, k, v, output_final_state=True, mode=mode, **HP)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    for got, want in zip(final, final_ref):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_refuses_a_spec_for_other_inputs():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="spec is for H=4"):
        run_ram_attention(q, k, v, build_spec(4, 6, dtype=torch.float64, **HP))
    with pytest.raises(ValueError, match="compute dtype torch.float64"):
        run_ram_attention(q, k, v, build_spec(3, 6, dtype=torch.float32, **HP))
    with pytest.raises(TypeError, match="RAMSpec"):
        run_ram_attention(q, k, v, HP)


def test_inputs_and_states_are_still_checked():
    q, k, v = _inputs()
    spec = build_spec(3, 6, dtype=torch.float64, **HP)
    with pytest.raises(ValueError, match="at least one token"):
        run_ram_attention(q[:, :0], k[:, :0], v[:, :0], spec)
    bad = RAMState.empty(2, 3, spec.memory_slots, 5, dtype=torch.float64, device="cpu")  # d_v 5, v has 4
    with pytest.raises(ValueError, match="initial_state.S"):
        run_ram_attention(q, k, v, spec, initial_state=bad)
