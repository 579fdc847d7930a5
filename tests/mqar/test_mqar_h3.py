"""H3 (ramnet/mqar/h3.py): its FFT convolutions equal the SSMs' recurrences, it is causal, its state
is Zoology's count, and it trains as an MQAR mixer."""

import pytest
import torch

from ramnet.mqar.h3 import H3, causal_fft_conv
from ramnet.mqar.model import mixer_state_size, resolve_mixer


def test_fft_convolution_is_the_direct_causal_sum():
    g = torch.Generator().manual_seed(0)
    u, kernel = torch.randn(2, 9, 3, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    direct = torch.zeros_like(u)
    for t in range(9):
        for s in range(max(0, t - 4), t + 1):
            direct[:, t] += kernel[:, t - s] * u[:, s]
    torch.testing.assert_close(causal_fft_conv(u, kernel), direct)


def test_the_diagonal_kernel_is_the_zero_order_hold_recurrence():
    torch.manual_seed(1)
    layer = H3(8, d_state=4, head_dim=2)
    transition, gain = layer.diag_modes()
    channels = layer.num_heads * 4
    u = torch.randn(11, channels, dtype=torch.float64)
    x = torch.zeros(channels, 2, dtype=torch.complex128)
    recurrent = []
    for t in range(11):  # x_t = exp(dt A) x_{t-1} + u_t ; y_t = 2 Re(sum_n gain_n x_t,n)
        x = transition.to(torch.complex128) * x + u[t, :, None]
        recurrent.append(2 * (gain.to(torch.complex128) * x).sum(-1).real)
    fft = causal_fft_conv(u[None], layer.diag_kernel(11).double())[0]
    torch.testing.assert_close(fft, torch.stack(recurrent), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head_dim", [1, 2])
def test_h3_is_causal_and_counts_zoologys_state(head_dim):
    torch.manual_seed(2)
    layer = H3(16, d_state=8, head_dim=head_dim)
    x = torch.randn(2, 12, 16)
    y = layer(x)[0]
    x2 = x.clone()
    x2[:, 7:] = torch.randn(2, 5, 16)
    assert y.shape == x.shape
    torch.testing.assert_close(layer(x2)[0][:, :7], y[:, :7])
    assert not torch.allclose(layer(x2)[0][:, 7:], y[:, 7:])
    assert mixer_state_size(layer, 12) == 16 * 8 + (16 // head_dim) * head_dim ** 2 * 8
    if head_dim == 1:
        assert layer.state_size(12) == 2 * 16 * 8  # Zoology's H3 formula, 2 x d x d_state


def test_h3_is_registered_checks_its_arguments_and_learns():
    assert resolve_mixer({"name": "h3"}) is H3
    for kwargs, match in [(dict(d_state=3), "d_state"), (dict(head_dim=3), "head_dim"), (dict(d_state=0), "d_state"),
                          (dict(dt_min=0.5, dt_max=0.1), "dt_min")]:
        with pytest.raises(ValueError, match=match):
            H3(16, **kwargs)
    with pytest.raises(ValueError, match="attention_mask"):
        H3(16)(torch.randn(1, 4, 16), attention_mask=torch.ones(1, 4))
    torch.manual_seed(3)
    layer = H3(8, d_state=4)
    x, target = torch.randn(4, 10, 8), torch.randn(4, 10, 8)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (layer(x)[0] - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(p.grad is not None for p in layer.parameters())


def test_the_paper_presets_ramnet_line_spans_1k_to_530k_floats_and_h3_is_a_baseline():
    from ramnet.mqar.model import MQARModel
    from ramnet.mqar.presets import PAPER

    def state(name, d_model):
        entry = PAPER["models"][name]
        with torch.device("meta"):
            return MQARModel(64, d_model, entry["mixer"], **{**PAPER["model"], **entry.get("model", {})}).state_size(1024)

    # 2 heads of d_model / 2 and M slots: 2 M (d_model / 2 + 1), plus the first layer's short convolution (3 d_model).
    assert state("ramnet M=16", 64) == 2 * 16 * 33 + 3 * 64 and state("ramnet M=16", 64) < 1_300
    assert [state(f"ramnet M={m}", 64) for m in (16, 64, 1024, 4096)] == sorted(
        [state(f"ramnet M={m}", 64) for m in (16, 64, 1024, 4096)])
    assert state("ramnet M=4096", 128) == 2 * 4096 * 65 + 3 * 128 and state("ramnet M=4096", 128) > 500_000
    assert state("h3", 64) == 2 * 64 * 64 + 3 * 64  # Zoology's H3 count, 2 d d_state
