"""PDMA building blocks: the proxy-gradient decay and the linear scan."""

import pytest
import torch

from ramnet.ops.pdma import linear_scan, proxy_decay, proxy_decay_slope
from ramnet.ops.pdma import scan as scan_module


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_decay_forward_is_exact_power(gamma):
    w = torch.tensor([0.0, 0.1, 0.5, 0.99, 1.0], dtype=torch.float64)
    out = proxy_decay(w, torch.tensor(gamma, dtype=torch.float64), 0.01)
    # pow's last bit differs between vectorised and scalar math libraries
    torch.testing.assert_close(out, (1 - w) ** gamma, rtol=1e-15, atol=0)
    assert out[0] == 1.0 and out[-1] == (1.0 if gamma == 0 else 0.0)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("pe", [0.01, 0.2])
def test_decay_backward_is_derivative_of_smoothed_power(gamma, pe):
    w = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.999], dtype=torch.float64, requires_grad=True)
    g = torch.tensor(gamma, dtype=torch.float64)
    (grad,) = torch.autograd.grad(proxy_decay(w, g, pe).sum(), w)

    def smoothed(x):
        return (pe + (1 - pe) * (1 - x)) ** gamma

    h = 1e-6
    finite_diff = (smoothed(w.detach() + h) - smoothed(w.detach() - h)) / (2 * h)
    torch.testing.assert_close(grad, finite_diff, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grad, proxy_decay_slope(w.detach(), g, pe))


def test_decay_proxy_gradient_is_finite_at_full_write():
    w = torch.ones(1, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(proxy_decay(w, torch.tensor(0.5, dtype=torch.float64), 0.01).sum(), w)
    assert torch.isfinite(grad).all() and grad.item() < 0
    w2 = torch.ones(1, dtype=torch.float64, requires_grad=True)
    (grad2,) = torch.autograd.grad(proxy_decay(w2, torch.tensor(2.0, dtype=torch.float64), 0.01).sum(), w2)
    assert grad2.item() != 0.0  # the exact derivative would vanish at w = 1


def _reference_scan(a, b):
    h, out = torch.zeros_like(b[0]), []
    for j in range(len(a)):
        h = a[j] * h + b[j]
        out.append(h)
    return torch.stack(out)


@pytest.mark.parametrize("n", [1, 7, scan_module.CHUNK, scan_module.CHUNK + 1, 5 * scan_module.CHUNK**2 + 3])
def test_linear_scan_matches_sequential_recurrence(n):
    gen = torch.Generator().manual_seed(n)
    a = torch.rand(n, dtype=torch.float64, generator=gen) * 1.2
    a[torch.rand(n, generator=gen) < 0.1] = 0.0  # chain cuts, as at segment starts
    b = torch.randn(n, 3, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(linear_scan(a, b), _reference_scan(a, b), rtol=1e-10, atol=1e-12)


def test_linear_scan_gradient():
    gen = torch.Generator().manual_seed(0)
    n = 3 * scan_module.CHUNK + 5
    a = (torch.rand(n, dtype=torch.float64, generator=gen)).requires_grad_()
    b = torch.randn(n, 2, dtype=torch.float64, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(linear_scan, (a, b))
