"""PDMA building blocks: the proxy-gradient decay and the linear scan."""

import pytest
import torch

from ramnet.ops.pdma import linear_scan, proxy_decay, proxy_decay_slope, segment_pdma
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


def _reference_scan(a, b, reverse=False):
    order = range(len(a) - 1, -1, -1) if reverse else range(len(a))
    h, out = torch.zeros_like(b[0]), {}
    for j in order:
        h = a[j] * h + b[j]
        out[j] = h
    return torch.stack([out[j] for j in range(len(a))])


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("n", [1, 7, scan_module.CHUNK, scan_module.CHUNK + 1, 5 * scan_module.CHUNK**2 + 3])
def test_linear_scan_matches_sequential_recurrence(n, reverse):
    gen = torch.Generator().manual_seed(n)
    a = torch.rand(n, dtype=torch.float64, generator=gen) * 1.2
    a[torch.rand(n, generator=gen) < 0.1] = 0.0  # chain cuts, as at segment starts
    b = torch.randn(n, 3, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(linear_scan(a, b, reverse), _reference_scan(a, b, reverse), rtol=1e-10, atol=1e-12)


def _segment_problem(with_initial):
    """Two rows of sorted writes (segments of 3, 1, 4 and 2, 6 writes), 3 tokens x K=2 reads per row."""
    gen = torch.Generator().manual_seed(5)
    starts = [0, 3, 4, 8, 10]
    seg_start = torch.zeros(16, dtype=torch.bool)
    seg_start[starts] = True
    f64 = dict(dtype=torch.float64)
    decay = torch.rand(16, generator=gen, **f64).requires_grad_()
    write_w = torch.rand(16, generator=gen, **f64).requires_grad_()
    v_ext = torch.cat([torch.randn(6, 3, generator=gen, **f64), torch.ones(6, 1, **f64)], 1).requires_grad_()
    read_w = torch.rand(12, generator=gen, **f64).requires_grad_()
    tensors = [decay, write_w, v_ext, read_w]
    kw = dict(write_token=torch.randint(0, 6, (16,), generator=gen), seg_start=seg_start,
              read_src=torch.randint(0, 16, (12,), generator=gen), hit=torch.rand(12, generator=gen) < 0.7,
              topk=2, eps=1e-3, empty_z=0.1)
    if with_initial:
        kw["h0"] = (torch.rand(16, 4, generator=gen, **f64) + 0.1).requires_grad_()
        kw["miss_rows"] = (torch.rand(12, 4, generator=gen, **f64) + 0.1).requires_grad_()
        tensors += [kw["h0"], kw["miss_rows"]]
    return tensors, kw


@pytest.mark.parametrize("with_initial", [False, True])
def test_segment_pdma_gradients(with_initial):
    tensors, kw = _segment_problem(with_initial)
    n_base = 4

    def fn(*xs):
        extra = dict(zip(["h0", "miss_rows"], xs[n_base:]))
        o, h = segment_pdma(*xs[:n_base], **{**kw, **extra})
        return o, h

    assert torch.autograd.gradcheck(fn, tuple(tensors))


def test_segment_pdma_forward_by_hand():
    tensors, kw = _segment_problem(with_initial=False)
    decay, write_w, v_ext, read_w = (t.detach() for t in tensors)
    o, h = segment_pdma(decay, write_w, v_ext, read_w, **kw)
    expected_h, state = [], None
    for j in range(16):
        h0 = torch.tensor([0.0, 0.0, 0.0, 0.1], dtype=torch.float64)
        prev = h0 if kw["seg_start"][j] else state
        state = decay[j] * prev + write_w[j] * v_ext[kw["write_token"][j]]
        expected_h.append(state)
    torch.testing.assert_close(h, torch.stack(expected_h))
    rows = torch.stack(expected_h)[kw["read_src"]]
    coef = read_w * kw["hit"] / (rows[:, 3] + kw["eps"])
    torch.testing.assert_close(o, (coef[:, None] * rows[:, :3]).view(6, 2, 3).sum(1))
