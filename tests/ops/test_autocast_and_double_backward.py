"""The ops' autograd Functions under bf16 autocast (fp32 inside, a backward that runs) and under a
second derivative (a clear error, never a wrong number)."""

import pytest
import torch

from ramnet.ops import ram_attention

HP = dict(num_partitions=2, topk=3, gamma=1.0, cape=True)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, 16, 2, 8, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 16, 2, 5, generator=g, requires_grad=True)
    return q, k, v


def test_parallel_path_keeps_fp32_under_bf16_autocast_and_its_backward_runs():
    q, k, v = _inputs()
    o_ref, _ = ram_attention(q, k, v, mode="parallel", **HP)
    grads_ref = torch.autograd.grad(o_ref.square().sum(), (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, _ = ram_attention(q, k, v, mode="parallel", **HP)
        grads = torch.autograd.grad(o.square().sum(), (q, k, v))
    assert o.dtype == torch.float32
    # fp32 inside: the same numbers as outside autocast (bf16 products would differ by ~1e-2)
    torch.testing.assert_close(o, o_ref, rtol=1e-6, atol=1e-6)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


def test_a_second_derivative_through_the_parallel_path_raises():
    q, k, v = _inputs()
    o, _ = ram_attention(q, k, v, mode="parallel", **HP)
    (grad_k,) = torch.autograd.grad(o.square().sum(), k, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        grad_k.square().sum().backward()


@pytest.mark.parametrize("mode", ["naive", "recurrent"])
def test_the_torch_reference_paths_keep_their_exact_second_derivatives(mode):
    # built from plain torch ops: a gradient penalty works there and matches finite differences
    # (gamma 0: no decay, so the proxy gradient of the decay, which finite differences do not see, is out of it)
    q, k, v = (x.double().detach().requires_grad_() for x in _inputs())

    def penalty(k):
        o, _ = ram_attention(q, k, v, mode=mode, **(HP | dict(gamma=0.0)))
        (grad_v,) = torch.autograd.grad(o.square().sum(), v, create_graph=True)
        return grad_v.square().sum()

    assert torch.autograd.gradcheck(penalty, (k,), eps=1e-6, atol=1e-4)
