"""RAMAttention's cached one-token step (``RAMMemory.step``): the fused Triton step where Triton runs
(here the CPU under the interpreter), the torch recurrent step otherwise, both in place and without
the op's checks; and the layer under flash-linear-attention's Cache protocol."""

import pytest
import torch

from ramnet.layers import RAMAttention
from ramnet.layers import memories
from ramnet.models import RAMNetCache
from ramnet.ops import RAMState
from ramnet.ops.ram import interface

pytest.importorskip("triton")  # the fused step's kernel runs here under TRITON_INTERPRET=1


def _layer(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    args = dict(hidden_size=24, num_heads=2, head_v_dim=6, num_partitions=2, partition_dim=4, topk=3,
                cape=[True, False], layer_idx=0)
    args.update(kw)
    return RAMAttention(**args).to(dtype).eval()


def _decode(layer, x, cache, prompt: int):
    """The prompt in one call, then one call per token; the outputs ``[B, T, hidden]``."""
    with torch.no_grad():
        outs = [layer(x[:, :prompt], past_key_values=cache, use_cache=True)[0]]
        for t in range(prompt, x.shape[1]):
            outs.append(layer(x[:, t : t + 1], past_key_values=cache, use_cache=True)[0])
    return torch.cat(outs, 1)


class Spy:
    """Counts the calls of a function that it stands in for."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("short_conv_size", [0, 3])
def test_fused_step_equals_torch_step_and_the_full_forward(monkeypatch, dtype, short_conv_size):
    layer = _layer(dtype, short_conv_size=short_conv_size)
    x = torch.randn(2, 9, 24, dtype=dtype)
    with torch.no_grad():
        full = layer(x)[0]
    fused, validated = Spy(memories.ram_decode_step), Spy(interface.run_ram_attention)
    monkeypatch.setattr(memories, "ram_decode_step", fused)
    monkeypatch.setattr(memories, "run_ram_attention", validated)
    kernel = _decode(layer, x, RAMNetCache(), 4)
    # 5 steps: the fused kernel, and the validated op for the prompt only
    assert fused.calls == 5 and validated.calls == 1
    monkeypatch.setattr(memories, "triton_runs_on", lambda device: False)  # as on a CPU without the interpreter
    torch_step = _decode(layer, x, RAMNetCache(), 4)
    assert fused.calls == 5 and validated.calls == 2
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
    torch.testing.assert_close(kernel, torch_step, **tol)
    torch.testing.assert_close(kernel, full, **tol)


def test_the_step_updates_the_cached_state_in_place():
    layer = _layer()
    cache = RAMNetCache()
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        layer(x[:, :4], past_key_values=cache, use_cache=True)
        S, z, offset = cache.get_state(0)
        before = S.clone()
        layer(x[:, 4:], past_key_values=cache, use_cache=True)
    state = cache.get_state(0)
    assert state.S is S and state.z is z and state.offset is offset
    assert offset.tolist() == [5, 5, 5] and not torch.equal(S, before)
    assert cache.get_seq_length() == 5


@pytest.mark.parametrize("mode", ["recurrent", "naive"])
def test_explicit_modes_pick_their_step(monkeypatch, mode):
    # "recurrent": the torch step in place, unchecked; "naive" (a reference path): the validated op.
    layer = _layer(mode=mode)
    fused, validated = Spy(memories.ram_decode_step), Spy(interface.run_ram_attention)
    monkeypatch.setattr(memories, "ram_decode_step", fused)
    monkeypatch.setattr(memories, "run_ram_attention", validated)
    x = torch.randn(1, 6, 24)
    with torch.no_grad():
        full = layer(x)[0]
    torch.testing.assert_close(_decode(layer, x, RAMNetCache(), 3), full, rtol=1e-5, atol=1e-6)
    assert fused.calls == 0 and validated.calls == (2 if mode == "recurrent" else 5)


def test_steps_with_padding_or_gradients_take_the_validated_op(monkeypatch):
    layer = _layer()
    fused = Spy(memories.ram_decode_step)
    monkeypatch.setattr(memories, "ram_decode_step", fused)
    x = torch.randn(2, 5, 24)
    cache = RAMNetCache()
    with torch.no_grad():
        layer(x[:, :4], past_key_values=cache, use_cache=True)
        mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
        o = layer(x[:, 4:], attention_mask=mask, past_key_values=cache, use_cache=True)[0]
    assert fused.calls == 0 and torch.equal(o[0], torch.zeros_like(o[0]))  # a padded step outputs zeros
    assert cache.get_state(0).offset.tolist() == [4, 5]  # and leaves the state alone
    layer(x[:, 4:], past_key_values=cache, use_cache=True)  # with autograd
    assert fused.calls == 0


def test_a_cache_needs_the_layer_index():
    layer = _layer(layer_idx=None)
    with pytest.raises(ValueError, match="layer_idx"):
        layer(torch.randn(1, 3, 24), past_key_values=RAMNetCache(), use_cache=True)
    with pytest.raises(TypeError, match="RAMNetCache"):
        _layer()(torch.randn(1, 3, 24), past_key_values=object(), use_cache=True)


class FakeFLACache:
    """fla.models.utils.Cache's protocol as fla's layers use it (fla 0.6.0): ``len``, ``cache[i]`` a dict of
    states, ``update(recurrent_state=, conv_state=, layer_idx=, offset=)`` keeping what is not passed,
    and beam reordering that maps every tensor of a state, tuples becoming plain tuples."""

    def __init__(self):
        self.states, self.seen = [], []

    def __len__(self):
        return len(self.states)

    def __getitem__(self, layer_idx):
        return self.states[layer_idx]

    def update(self, recurrent_state=None, attn_state=None, conv_state=None, ffn_state=None, layer_idx=0, offset=1,
               cache_kwargs=None):
        while len(self.states) <= layer_idx:
            self.states.append(dict(recurrent_state=None, attn_state=None, conv_state=None, ffn_state=None))
            self.seen.append(0)
        state = self.states[layer_idx]
        if recurrent_state is not None:
            state["recurrent_state"] = recurrent_state
        if conv_state is not None:
            state["conv_state"] = conv_state
        self.seen[layer_idx] += offset
        return state

    def reorder_cache(self, beam_idx):
        def apply(value):
            if isinstance(value, torch.Tensor):
                return value.index_select(0, beam_idx)
            return tuple(apply(v) for v in value) if isinstance(value, tuple) else value

        self.states = [{key: apply(value) for key, value in state.items()} for state in self.states]


@pytest.mark.parametrize("short_conv_size", [0, 4])
def test_the_layer_follows_flas_cache_protocol(short_conv_size):
    layer = _layer(short_conv_size=short_conv_size, layer_idx=1)
    x = torch.randn(2, 8, 24)
    expected = _decode(layer, x, RAMNetCache(), 5)
    cache = FakeFLACache()
    assert torch.equal(_decode(layer, x, cache, 5), expected)
    assert len(cache) == 2 and cache.seen == [0, 8]
    entry = cache[1]
    assert isinstance(entry["recurrent_state"], RAMState) and entry["recurrent_state"].offset.tolist() == [8, 8]
    assert (entry["conv_state"] is None) == (short_conv_size == 0)
    # fla's beam reordering turns the RAMState into a plain tuple: the layer reads it back as one
    cache.reorder_cache(torch.tensor([1, 1]))
    assert type(cache[1]["recurrent_state"]) is tuple
    y = torch.randn(1, 1, 24).expand(2, 1, 24)
    with torch.no_grad():
        o = layer(y, past_key_values=cache, use_cache=True)[0]
    torch.testing.assert_close(o[0], o[1])


def test_the_layer_works_with_flas_own_cache():
    utils = pytest.importorskip("fla.models.utils", reason="flash-linear-attention is not installed")
    layer = _layer(short_conv_size=4, layer_idx=0)
    x = torch.randn(2, 7, 24)
    expected = _decode(layer, x, RAMNetCache(), 4)
    cache = utils.Cache()
    assert torch.equal(_decode(layer, x, cache, 4), expected)
    assert cache.get_seq_length() == 7
    cache.reorder_cache(torch.tensor([0, 0]))
    with torch.no_grad():
        o = layer(x[:1, :1].expand(2, 1, 24), past_key_values=cache, use_cache=True)[0]
    torch.testing.assert_close(o[0], o[1])
