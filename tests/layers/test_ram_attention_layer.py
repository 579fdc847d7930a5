"""The RAMAttention token mixer."""

import sys

import pytest
import torch

from ramnet.layers import HybridRAMAttention, RAMAttention
from ramnet.models import RAMNetCache
from ramnet.ops.ram import spec as spec_module


def _layer(**kw):
    torch.manual_seed(0)
    args = dict(hidden_size=24, num_heads=2, head_v_dim=6, num_partitions=2, partition_dim=4, topk=3,
                cape=[True, False])
    args.update(kw)
    return RAMAttention(**args).double()


def test_forward_backward_shapes_and_gradients():
    layer = _layer()
    x = torch.randn(2, 9, 24, dtype=torch.float64, requires_grad=True)
    o, attn, cache = layer(x)
    assert o.shape == x.shape and attn is None and cache is None
    o.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_the_layer_reads_no_tensor_values_on_the_host(monkeypatch):
    # Training, a prompt into a cache and a prompt continuing it: the op's value scans (q, k, v and the cached
    # state finite), each a GPU synchronisation, are the public op's, not the layer's.
    from ramnet.ops.ram import interface

    def scanned(*args, **kwargs):
        raise AssertionError("a value scan on the layer's path")

    layer = _layer(layer_idx=0)
    x = torch.randn(2, 9, 24, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr(interface, "check_finite", scanned)
    layer(x)[0].sum().backward()
    cache = RAMNetCache()
    with torch.no_grad():
        layer(x[:, :5], past_key_values=cache, use_cache=True)
        layer(x[:, 5:], past_key_values=cache, use_cache=True)
    # ... while the op itself still scans (and says which input is bad).
    q = torch.full((1, 3, 2, 8), float("nan"), dtype=torch.float64)
    with pytest.raises(AssertionError, match="value scan"):
        interface.ram_attention(q, q, torch.zeros(1, 3, 2, 6, dtype=torch.float64), num_partitions=2, topk=3)


def test_log_scales_scale_q_and_k_per_head():
    # e^alpha multiplies the head's q (and k) logits: a doubled alpha-scale equals doubled weights.
    layer, scaled = _layer(), _layer()
    with torch.no_grad():
        scaled.q_log_scale[1] = torch.log(torch.tensor(2.0))
        layer.q_proj.weight[8:] *= 2.0  # head 1's rows (d_k = 8)
    x = torch.randn(1, 7, 24, dtype=torch.float64)
    torch.testing.assert_close(scaled(x)[0], layer(x)[0])


def test_padding_is_skipped():
    layer = _layer()
    x = torch.randn(2, 8, 24, dtype=torch.float64)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[0, 5] = 0  # a hole in the middle
    o, _, _ = layer(x, attention_mask=mask)
    alone1, _, _ = layer(x[1:, 3:])
    alone0, _, _ = layer(x[:1, mask[0].bool()])
    torch.testing.assert_close(o[1, 3:], alone1[0])
    torch.testing.assert_close(o[0, mask[0].bool()], alone0[0])
    assert torch.equal(o[1, :3], torch.zeros_like(o[1, :3]))


def test_cache_continues_the_sequence():
    layer = _layer(mode="parallel", layer_idx=0)
    x = torch.randn(2, 10, 24, dtype=torch.float64)
    full, _, _ = layer(x)
    cache = RAMNetCache()
    first, _, cache = layer(x[:, :6], past_key_values=cache, use_cache=True)
    steps = [layer(x[:, t : t + 1], past_key_values=cache, use_cache=True)[0] for t in range(6, 10)]
    torch.testing.assert_close(torch.cat([first, *steps], 1), full)
    assert cache.get_seq_length() == 10
    assert cache.get_state(0).offset.tolist() == [10, 10]


@pytest.mark.parametrize("mode", [None, "recurrent", "parallel", "naive"])
@torch.no_grad()
def test_decoding_without_grad_in_every_mode(mode):
    # One-token steps update the cached state in place where the op allows it (its recurrent
    # path); a layer pinned to another path decodes with a copy instead of raising.
    layer = _layer(mode=mode, layer_idx=0)
    x = torch.randn(2, 8, 24, dtype=torch.float64)
    full, _, _ = layer(x)
    cache = RAMNetCache()
    first, _, cache = layer(x[:, :5], past_key_values=cache, use_cache=True)
    S = cache.get_state(0).S
    steps = [layer(x[:, t : t + 1], past_key_values=cache, use_cache=True)[0] for t in range(5, 8)]
    torch.testing.assert_close(torch.cat([first, *steps], 1), full)
    assert (cache.get_state(0).S is S) == (mode in (None, "recurrent"))


def test_bad_configuration_and_input():
    with pytest.raises(ValueError, match="cape must be a bool or one bool per head"):
        _layer(cape=[True])
    with pytest.raises(ValueError, match="topk"):
        _layer(topk=17)  # M = 16
    with pytest.raises(ValueError, match=r"mode must be one of \[None, 'naive', 'parallel', 'recurrent', 'triton'\]"):
        _layer(mode="fused")
    layer = _layer()
    with pytest.raises(ValueError, match="hidden_states must be"):
        layer(torch.randn(1, 3, 25, dtype=torch.float64))
    with pytest.raises(ValueError, match="attention_mask must be"):
        layer(torch.randn(2, 3, 24, dtype=torch.float64), attention_mask=torch.ones(2, 2))


def test_forwards_do_not_build_the_spec(monkeypatch):
    # build_spec checks gamma on the device (a host synchronisation): a layer builds its spec once,
    # when constructed, and no forward builds it again, whatever the path, cache or dtype.
    calls = []

    def counted(*args, **kwargs):
        calls.append(args)
        return build_spec(*args, **kwargs)

    build_spec = spec_module.build_spec
    for module in list(sys.modules.values()):  # every module that imported it by name
        if module.__name__.startswith("ramnet") and getattr(module, "build_spec", None) is build_spec:
            monkeypatch.setattr(module, "build_spec", counted)
    ram = _layer(layer_idx=0, gamma=0.5)
    hybrid = HybridRAMAttention(hidden_size=24, num_heads=2, head_v_dim=6, num_partitions=2, partition_dim=4, topk=3,
                                cape=True, window_size=2, blend="delayed_chunk", layer_idx=0).double()
    assert len(calls) == 2
    x = torch.randn(2, 6, 24, dtype=torch.float64)
    for layer in (ram, hybrid):
        layer(x)[0].sum().backward()
        with torch.no_grad():
            cache = RAMNetCache()
            layer(x[:, :5], past_key_values=cache, use_cache=True)
            layer(x[:, 5:], past_key_values=cache, use_cache=True)  # a decoding step
            layer.float()(x.float())
    assert len(calls) == 2


@torch.no_grad()
def test_the_spec_follows_the_input_dtype():
    # gamma is kept per compute dtype: after fp32 forwards an fp64 one computes with an fp64 gamma
    layer, fresh = _layer(gamma=0.3), _layer(gamma=0.3)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    layer.float()(x.float())
    assert torch.equal(layer.double()(x)[0], fresh(x)[0])
