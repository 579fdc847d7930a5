"""Generation on the fast path: the cached step in place (RAMMemory.step), the static cache
(`RAMNetStaticCache`, fixed buffers, `is_compileable`) and how `generate` picks its cache.

On the CPU the static cache runs eagerly and must equal the dynamic cache token for token; that
one whole decoding step of the model traces into one graph with no break (no host reads) is
checked with torch.compile's eager backend. The CUDA graph itself is checked in
tests/models/test_generation_cuda.py (skipped without a GPU)."""

import pytest
import torch

from ramnet.layers import memories
from ramnet.models import RAMNetCache, RAMNetStaticCache
from ramnet.models.ramnet import modeling_ramnet
from ramnet.ops import RAMState

from model_helpers import Collect, random_ids, tiny_model
from test_modeling_ramnet import greedy_without_cache, left_pad

IMPLEMENTATIONS = ["dynamic", "static"]


def _model(**overrides):
    # fp32: the dtype of generation, where the steps run the fused kernel (TRITON_INTERPRET=1 here)
    return tiny_model(torch.float32, **overrides)


@pytest.fixture
def torch_step(monkeypatch):
    """The torch recurrent step in place of the fused kernel, which takes about a second per layer and
    step in Triton's interpreter; tests/layers/test_ram_attention_decode_step.py checks that the two agree."""
    monkeypatch.setattr(memories, "triton_runs_on", lambda device: False)


@torch.no_grad()
@pytest.mark.parametrize("implementation", [None, *IMPLEMENTATIONS])
def test_greedy_tokens_equal_the_full_forwards_argmax(monkeypatch, implementation):
    fused = []
    step = memories.ram_decode_step
    monkeypatch.setattr(memories, "ram_decode_step", lambda *a, **k: fused.append(1) or step(*a, **k))
    model = _model(short_conv_size=3, num_hidden_layers=2, num_cape_heads=[4, 2])
    prompt = random_ids(2, 7)
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, cache_implementation=implementation,
                         return_dict_in_generate=True)
    assert len(fused) == 2 * 3  # 2 layers, 3 steps: the fused kernel
    assert torch.equal(out.sequences, greedy_without_cache(model, prompt, 4))
    # None on the CPU: the dynamic cache (the static one is the default on CUDA only)
    expected = RAMNetStaticCache if implementation == "static" else RAMNetCache
    assert type(out.past_key_values) is expected and out.past_key_values.get_seq_length() == 7 + 4 - 1


@pytest.mark.usefixtures("torch_step")
@torch.no_grad()
def test_static_cache_equals_dynamic_when_sampling_stopping_and_streaming():
    model = _model()
    ids, mask = left_pad([random_ids(1, 6, seed=2)[0], random_ids(1, 3, seed=3)[0]])
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    eos = int(greedy[0, ids.shape[1] + 2])  # row 0 stops at its third new token
    runs = {}
    for implementation in IMPLEMENTATIONS:
        torch.manual_seed(0)
        streamer = Collect()
        sampled = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=0.9,
                                 top_k=20, top_p=0.9, cache_implementation=implementation, streamer=streamer)
        stopped = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos,
                                 pad_token_id=0, cache_implementation=implementation)
        runs[implementation] = sampled, stopped, streamer.chunks
    assert all(torch.equal(a, b) for a, b in zip(runs["dynamic"][:2], runs["static"][:2]))
    assert runs["dynamic"][2] == runs["static"][2]
    sampled, stopped, chunks = runs["static"]
    assert chunks[0] == ids.tolist() and chunks[-1] == "end"
    assert [token for chunk in chunks[1:-1] for token in chunk] == sampled[:, ids.shape[1]:].T.flatten().tolist()
    new = stopped[0, ids.shape[1]:].tolist()
    assert new[:3] == greedy[0, ids.shape[1]:ids.shape[1] + 3].tolist() and set(new[3:]) <= {0}


@pytest.mark.usefixtures("torch_step")
@torch.no_grad()
def test_static_cache_left_padding_beams_and_chunked_prefill():
    model = _model(short_conv_size=2)
    sequences = [random_ids(1, 9, seed=2)[0], random_ids(1, 5, seed=3)[0], random_ids(1, 1, seed=4)[0]]
    ids, mask = left_pad(sequences)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation="static")
    for row, seq in enumerate(sequences):
        alone = model.generate(seq[None], max_new_tokens=6, do_sample=False, cache_implementation="static")
        assert torch.equal(batch[row, ids.shape[1]:], alone[0, len(seq):])
    # the prompt in chunks through the op (transformers' prefill_chunk_size), then the steps
    chunked = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation="static",
                             prefill_chunk_size=4)
    assert torch.equal(chunked, batch)
    beams = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False)
    prompt = random_ids(2, 5)
    assert torch.equal(model.generate(prompt, cache_implementation="static", **beams),
                       model.generate(prompt, use_cache=False, **beams))


@pytest.mark.usefixtures("torch_step")
def test_static_buffers_keep_their_addresses():
    model = _model(short_conv_size=3)
    cache = RAMNetStaticCache(model.config)
    assert cache.is_compileable and not cache.is_croppable and cache.get_seq_length() == 0
    ids = random_ids(3, 6)
    with torch.no_grad():
        model(ids[:, :4], cache=cache, use_cache=True)
        layer = cache.layers[0]
        pointers = [t.data_ptr() for t in (*layer.state, layer.conv_history, layer.length)]
        model(ids[:, 4:5], cache=cache, use_cache=True)
        cache.reorder_cache(torch.tensor([2, 0, 1]))
        model(ids[:, 5:], cache=cache, use_cache=True)
        assert [t.data_ptr() for t in (*layer.state, layer.conv_history, layer.length)] == pointers
        assert cache.get_seq_length() == 6 and layer.state.offset.tolist() == [6, 6, 6]
        cache.reset()  # back to an empty state, in the same buffers
        assert [t.data_ptr() for t in (*layer.state, layer.conv_history, layer.length)] == pointers
        assert cache.get_seq_length() == 0 and layer.state.offset.tolist() == [0, 0, 0]
        again = model(ids, cache=cache, use_cache=True).logits
        torch.testing.assert_close(again, model(ids).logits)
    smaller = RAMState(*(t[:2] for t in layer.state))
    with pytest.raises(ValueError, match="shapes of its first write"):
        cache.update_state(0, smaller, num_new_tokens=1)


@torch.no_grad()
def test_one_decoding_step_traces_into_one_graph_without_host_reads(monkeypatch):
    """fullgraph=True fails on any graph break: a host read of a tensor (``bool(x)``, ``.item()``), a
    Python int that changes every step, an untraceable call. The torch step stands in for the
    Triton kernel (which the CPU's interpreter cannot trace)."""
    monkeypatch.setattr(memories, "triton_runs_on", lambda device: False)
    torch._dynamo.reset()
    model = _model(short_conv_size=3)
    cache = RAMNetStaticCache(model.config)
    reference = RAMNetCache()
    ids = random_ids(2, 9)
    model(ids[:, :5], cache=cache, use_cache=True)
    model(ids[:, :5], cache=reference, use_cache=True)
    counters = torch._dynamo.utils.counters
    counters.clear()
    step = torch.compile(model, fullgraph=True, backend="eager")
    for t in range(5, 9):
        compiled = step(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True, logits_to_keep=1).logits
        eager = model(input_ids=ids[:, t:t + 1], cache=reference, use_cache=True, logits_to_keep=1).logits
        torch.testing.assert_close(compiled, eager)
    assert counters["stats"]["unique_graphs"] == 1  # one trace for every step: no recompilation
    torch._dynamo.reset()


@pytest.mark.usefixtures("torch_step")
@torch.no_grad()
def test_decoding_steps_get_no_padding_mask(monkeypatch):
    model = _model()
    seen = []
    forward = type(model.model).forward

    def spy(self, *args, attention_mask=None, **kwargs):
        seen.append(None if attention_mask is None else tuple(attention_mask.shape))
        return forward(self, *args, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(type(model.model), "forward", spy)
    ids, mask = left_pad([random_ids(1, 4, seed=2)[0], random_ids(1, 2, seed=3)[0]])
    model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, cache_implementation="static")
    # the prompt gets its padding mask; generate's own tokens are real, so the steps get none
    assert seen == [(2, 4), None, None, None]


@pytest.mark.usefixtures("torch_step")
def test_new_cache_choices(monkeypatch):
    model = _model()
    assert type(model.new_cache()) is RAMNetCache  # on the CPU
    with monkeypatch.context() as patch:  # on CUDA the static cache is the default
        patch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
        assert type(model.new_cache()) is RAMNetStaticCache
        hybrid = _model(mixer_types=["ramnet", "hybrid", "ramnet"])
        assert type(hybrid.new_cache()) is RAMNetCache  # a hybrid keeps windows: no static cache for it
        patch.setattr(modeling_ramnet, "STATIC_CACHE_BY_DEFAULT_ON_CUDA", False)  # the switch to turn it off
        assert type(model.new_cache()) is RAMNetCache
    assert type(model.new_cache("dynamic")) is RAMNetCache
    assert type(model.new_cache("static")) is RAMNetStaticCache
    with pytest.raises(ValueError, match="cache_implementation"):
        model.new_cache("offloaded")
    hybrid = _model(mixer_types=["ramnet", "hybrid", "ramnet"])
    with pytest.raises(ValueError, match="mixer_types"):
        hybrid.new_cache("static")
    with pytest.raises(ValueError, match="mixer_types"):
        hybrid.generate(random_ids(1, 3), max_new_tokens=2, cache_implementation="static")
    assert hybrid.generate(random_ids(1, 3), max_new_tokens=2, do_sample=False).shape == (1, 5)


@pytest.mark.usefixtures("torch_step")
@torch.no_grad()
def test_generate_from_inputs_embeds_still_works():
    # prepare_inputs_for_generation is overridden: generate still finds inputs_embeds in its signature
    model = _model()
    ids = random_ids(2, 5)
    from_embeds = model.generate(inputs_embeds=model.model.embed_tokens(ids), max_new_tokens=3, do_sample=False)
    assert torch.equal(from_embeds, model.generate(ids, max_new_tokens=3, do_sample=False)[:, 5:])
