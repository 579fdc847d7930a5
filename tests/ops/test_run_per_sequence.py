"""``run_per_sequence``, the varlen loop of the stepping paths, on states of any shape: a bare tensor
or a NamedTuple of tensors, one entry per sequence along dim 0."""

from typing import NamedTuple

import torch

from ramnet.ops.ram.common import run_per_sequence


class Totals(NamedTuple):
    total: torch.Tensor  # [N, D]
    count: torch.Tensor  # [N]


def running_sum(x, y, total):
    """A stand-in recurrence: o_t = total + sum of x + y up to t; the final state the last sum."""
    o = total[:, None] + (x + y).cumsum(1)
    return o, total + (x + y).sum(1)


def test_tensor_state_continues_each_sequence_from_its_own_entry():
    x, y = torch.randn(1, 7, 3), torch.randn(1, 7, 3)
    state = torch.randn(3, 3)
    cu_seqlens = torch.tensor([0, 4, 4, 7])  # the middle sequence is empty
    o, final = run_per_sequence(running_sum, (x, y), state, cu_seqlens)
    for n, (a, b) in enumerate([(0, 4), (4, 4), (4, 7)]):
        o_n, final_n = running_sum(x[:, a:b], y[:, a:b], state[n : n + 1])
        torch.testing.assert_close(o[:, a:b], o_n, rtol=0, atol=0)
        torch.testing.assert_close(final[n : n + 1], final_n, rtol=0, atol=0)
    torch.testing.assert_close(final[1], state[1], rtol=0, atol=0)  # nothing written


def test_named_tuple_state_comes_back_in_its_type():
    x = torch.randn(1, 5, 2)

    def core(x, state):
        return x * 2, Totals(state.total + x.sum(1), state.count + x.shape[1])

    state = Totals(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))
    o, final = run_per_sequence(core, (x,), state, torch.tensor([0, 2, 5]))
    assert isinstance(final, Totals)
    torch.testing.assert_close(o, x * 2)
    torch.testing.assert_close(final.total, torch.stack([x[0, :2].sum(0), x[0, 2:].sum(0)]))
    assert final.count.tolist() == [2, 3]


def test_without_cu_seqlens_one_call_on_the_whole_batch():
    x, y, state = torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.randn(2, 3)
    o, final = run_per_sequence(running_sum, (x, y), state, None)
    o_all, final_all = running_sum(x, y, state)
    torch.testing.assert_close(o, o_all, rtol=0, atol=0)
    torch.testing.assert_close(final, final_all, rtol=0, atol=0)
