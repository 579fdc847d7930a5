"""The CPU baseline mixers: what they compute, their causality and their Zoology state sizes."""

import math

import pytest
import torch
import torch.nn.functional as F

from ramnet.mqar.mixers import BasedLinearAttention, ZoologyAttention, ZoologySlidingWindowAttention
from ramnet.mqar.model import resolve_mixer


def _x(B=2, T=12, D=16, seed=0):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _reference_attention(layer, x, window=None):
    """Softmax attention written out: scores, (banded) causal mask, softmax, weighted sum."""
    B, T, D = x.shape
    H = layer.num_heads
    q, k, v = (t.view(B, T, H, -1).transpose(1, 2) for t in layer.qkv_proj(x).chunk(3, -1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(D // H)
    lag = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    allowed = (lag >= 0) & (lag < (window or T))
    o = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    return layer.out_proj(o.transpose(1, 2).reshape(B, T, D))


@pytest.mark.parametrize("heads", [1, 4])
def test_attention_matches_reference(heads):
    layer = ZoologyAttention(16, num_heads=heads, dropout=0.1).double().eval()
    x = _x()
    o, none, cache = layer(x)
    assert none is None and cache is None
    torch.testing.assert_close(o, _reference_attention(layer, x))


@pytest.mark.parametrize("window", [1, 3, 5])
def test_sliding_window_matches_reference_and_sees_only_its_window(window):
    layer = ZoologySlidingWindowAttention(16, window=window, num_heads=2).double().eval()
    x = _x()
    o = layer(x)[0]
    torch.testing.assert_close(o, _reference_attention(layer, x, window))
    # a token `window` or more steps back, and any later token, leaves the output at t unchanged
    t = 8
    x2 = x.clone()
    x2[:, t - window] += 1.0
    x2[:, t + 1:] += 1.0
    torch.testing.assert_close(layer(x2)[0][:, t], o[:, t])
    assert not torch.allclose(layer(x2)[0][:, t - window], o[:, t - window])


def test_sliding_window_longer_than_sequence_is_full_attention():
    torch.manual_seed(0)
    full = ZoologyAttention(16, num_heads=2).double().eval()
    slide = ZoologySlidingWindowAttention(16, window=64, num_heads=2).double().eval()
    slide.load_state_dict(full.state_dict())
    x = _x()
    torch.testing.assert_close(slide(x)[0], full(x)[0])


def _taylor_features(x):
    """Based's TaylorExp map: phi(q).phi(k) = 1 + q.k/sqrt(f) + (q.k)^2/(2f)."""
    f = x.shape[-1]
    outer = (x[..., :, None] * x[..., None, :]).flatten(-2)
    return torch.cat([torch.ones_like(x[..., :1]), x / f ** 0.25, outer / (math.sqrt(2) * math.sqrt(f))], -1)


@pytest.mark.parametrize("feature_map", ["taylor", "elu"])
def test_linear_attention_matches_the_recurrent_form(feature_map):
    """The quadratic (kernel matrix) form equals the recurrence S_t = S_{t-1} + phi(k_t) v_t^T,
    z_t = z_{t-1} + phi(k_t), o_t = phi(q_t) S_t / (phi(q_t) . z_t)."""
    layer = BasedLinearAttention(16, num_heads=2, feature_dim=4, feature_map=feature_map).double()
    x = _x()
    B, T, _ = x.shape
    q, k, v = (p(x).view(B, T, 2, -1) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    phi = _taylor_features if feature_map == "taylor" else (lambda t: F.elu(t) + 1)
    fq, fk = phi(q), phi(k)
    S = torch.zeros(B, 2, fk.shape[-1], v.shape[-1], dtype=x.dtype)
    z = torch.zeros(B, 2, fk.shape[-1], dtype=x.dtype)
    outs = []
    for t in range(T):
        S = S + fk[:, t, :, :, None] * v[:, t, :, None, :]
        z = z + fk[:, t]
        num = (fq[:, t, :, :, None] * S).sum(-2)
        outs.append(num / ((fq[:, t] * z).sum(-1, keepdim=True) + layer.eps))
    expected = layer.out_proj(torch.stack(outs, 1).reshape(B, T, 16))
    torch.testing.assert_close(layer(x)[0], expected)


def test_state_sizes_follow_zoology():
    assert ZoologyAttention(64, num_heads=2).state_size(1024) == 2 * 64 * 1024
    assert ZoologySlidingWindowAttention(64, window=32).state_size(1024) == 2 * 32 * 64
    # Zoology's Based at d_model 64, feature_dim 16, one head: 64 * 153 + 153
    based = BasedLinearAttention(64, num_heads=1, feature_dim=16, feature_map="taylor")
    assert based.expanded_size() == 16 * 17 // 2 + 16 + 1 == 153
    assert based.state_size(1024) == 64 * 153 + 153
    elu = BasedLinearAttention(64, num_heads=4, feature_dim=8, feature_map="elu")
    assert elu.state_size(1024) == 4 * (16 + 1) * 8


@pytest.mark.parametrize("make", [
    lambda: ZoologyAttention(16, num_heads=3),
    lambda: ZoologyAttention(16, dropout=1.0),
    lambda: ZoologySlidingWindowAttention(16, window=0),
    lambda: ZoologySlidingWindowAttention(16, window=2.5),
    lambda: BasedLinearAttention(16, feature_map="relu"),
    lambda: BasedLinearAttention(16, num_heads=5),
])
def test_bad_arguments_raise(make):
    with pytest.raises(ValueError):
        make()


def test_padding_and_cache_are_refused():
    layer = ZoologyAttention(16)
    x = _x(D=16).float()
    with pytest.raises(ValueError, match="whole, unpadded"):
        layer(x, attention_mask=torch.ones(2, 12))
    with pytest.raises(ValueError, match="whole, unpadded"):
        BasedLinearAttention(16)(x, use_cache=True)


def test_registry_names_of_presets_and_results_name_these_classes():
    assert resolve_mixer({"name": "attention"}) is ZoologyAttention
    assert resolve_mixer({"name": "sliding_window"}) is ZoologySlidingWindowAttention
    assert resolve_mixer({"name": "linear_attention"}) is BasedLinearAttention
