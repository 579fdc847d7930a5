"""`generate` on CUDA with `cache_implementation="static"` (the default there,
`STATIC_CACHE_BY_DEFAULT_ON_CUDA`): a `RAMNetStaticCache`, and by default (`decode_loop.BY_DEFAULT_ON_CUDA`, which
these tests pin on) RAM-Net's decode loop
(ramnet/models/ramnet/decode_loop.py: one whole step, sampler and stop tokens included, captured in a
CUDA graph and replayed); with `ramnet_decode_loop=False`, transformers' loop with each decoding step
through its auto-compilation (torch.compile, mode "reduce-overhead"). Their tokens must be the eager
loop's and the full forward's (skipped without a GPU).

Run on a GPU machine with: python -m pytest -q -m cuda tests/models/test_generation_cuda.py
"""

import pytest
import torch

from ramnet.models import RAMNetStaticCache
from ramnet.models.ramnet import decode_loop

from model_helpers import Collect, random_ids, tiny_model
from test_modeling_ramnet import greedy_without_cache, left_pad

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def decode_loop_by_default_on_cuda(monkeypatch):
    # The shipped default; pinned so that the tests check the loop even where a user turns it off.
    monkeypatch.setattr(decode_loop, "BY_DEFAULT_ON_CUDA", True)


def _model(dtype=torch.float32, **overrides):
    return tiny_model(dtype, **overrides).cuda()


@torch.no_grad()
@pytest.mark.parametrize("short_conv_size", [0, 3])
def test_the_graph_loop_gives_the_eager_loops_and_the_full_forwards_tokens(short_conv_size):
    model = _model(short_conv_size=short_conv_size)
    prompt = random_ids(2, 7).cuda()
    graph = model.generate(prompt, max_new_tokens=12, do_sample=False, return_dict_in_generate=True,
                           cache_implementation="static", ramnet_decode_loop=False)
    assert isinstance(graph.past_key_values, RAMNetStaticCache)
    assert hasattr(model, "_compiled_call")  # generate compiled the step (the graph path)
    eager = model.generate(prompt, max_new_tokens=12, do_sample=False, disable_compile=True, ramnet_decode_loop=False)
    dynamic = model.generate(prompt, max_new_tokens=12, do_sample=False, cache_implementation="dynamic")
    assert torch.equal(graph.sequences, eager) and torch.equal(graph.sequences, dynamic)
    assert torch.equal(graph.sequences, greedy_without_cache(model, prompt, 12))


@torch.no_grad()
def test_the_graph_loop_with_left_padding_stop_tokens_and_bf16():
    model = _model(torch.bfloat16)
    sequences = [random_ids(1, 9, seed=2)[0], random_ids(1, 5, seed=3)[0], random_ids(1, 1, seed=4)[0]]
    ids, mask = (x.cuda() for x in left_pad(sequences))
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, cache_implementation="static",
                  ramnet_decode_loop=False)
    graph = model.generate(ids, **kwargs)
    assert torch.equal(graph, model.generate(ids, disable_compile=True, **kwargs))
    eos = int(graph[0, ids.shape[1] + 3])
    stopped = model.generate(ids, eos_token_id=eos, pad_token_id=0, **kwargs)
    assert torch.equal(stopped, model.generate(ids, eos_token_id=eos, pad_token_id=0, disable_compile=True, **kwargs))
    # sampling is outside the graph (generate's logits processors): the same seed, the same tokens
    runs = []
    for compile_off in (False, True):
        torch.manual_seed(0)
        runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=0.8,
                                   top_k=20, top_p=0.9, disable_compile=compile_off, cache_implementation="static",
                                   ramnet_decode_loop=False))
    assert runs[0].shape == runs[1].shape


def _generate(model, ids, **kwargs):
    """`model.generate` and how the decode loop ran: "graph", "eager" or None (transformers' loop)."""
    model._ramnet_decode_loop_last = None
    out = model.generate(ids, **kwargs)
    last = model._ramnet_decode_loop_last
    return out, None if last is None else ("graph" if last["graph"] else "eager")


@torch.no_grad()
@pytest.mark.parametrize("short_conv_size", [0, 3])
def test_the_decode_loops_graph_gives_the_eager_loops_and_the_full_forwards_tokens(short_conv_size):
    """fp32 greedy: the captured decode loop (the default on CUDA, no cache_implementation given), the same
    loop eager, transformers' loop and the full forward's argmax, token for token."""
    model = _model(short_conv_size=short_conv_size)
    prompt = random_ids(2, 7).cuda()
    graph, how = _generate(model, prompt, max_new_tokens=40, do_sample=False, ramnet_decode_loop="graph")
    assert how == "graph" and model._ramnet_decode_loop_last["capture_s"] > 0
    eager, how_eager = _generate(model, prompt, max_new_tokens=40, do_sample=False, ramnet_decode_loop="eager")
    assert how_eager == "eager"
    hf, how_hf = _generate(model, prompt, max_new_tokens=40, do_sample=False, ramnet_decode_loop=False,
                           cache_implementation="dynamic")
    assert how_hf is None
    assert torch.equal(graph, eager) and torch.equal(graph, hf)
    assert torch.equal(graph, greedy_without_cache(model, prompt, 40))
    # a second call of the same shape replays the kept graph (no capture) and decodes the same
    again, how = _generate(model, prompt, max_new_tokens=40, do_sample=False, ramnet_decode_loop="graph")
    last = model._ramnet_decode_loop_last
    assert how == "graph" and last["reused"] and not last["captured"] and last["captures"] == 1
    assert torch.equal(again, graph)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_step_in_the_graph_gives_the_eager_loops_tokens(dtype):
    """Greedy: `ramnet_decode_loop="compiled"` (the model step through torch.compile, the Triton step
    kernel inside it, then captured) against the eager loop, and a second call replaying its graph. In bf16
    too: `compile_step` rounds as eager does (without it the tokens differed from the first steps on)."""
    torch._dynamo.reset()
    model = _model(dtype)
    prompt = random_ids(2, 7).cuda()
    eager, _ = _generate(model, prompt, max_new_tokens=40, do_sample=False, ramnet_decode_loop="eager")
    compiled, how = _generate(model, prompt, max_new_tokens=40, do_sample=False, ramnet_decode_loop="compiled")
    assert how == "graph" and model._ramnet_decode_loop_last["compiled"]
    assert torch.equal(compiled, eager)
    again, how = _generate(model, prompt, max_new_tokens=40, do_sample=False, ramnet_decode_loop="compiled")
    assert how == "graph" and not model._ramnet_decode_loop_last["captured"] and torch.equal(again, eager)


@torch.no_grad()
def test_the_decode_loops_graph_with_left_padding_stop_tokens_sampling_and_streaming():
    model = _model()
    sequences = [random_ids(1, 9, seed=2)[0], random_ids(1, 5, seed=3)[0], random_ids(1, 1, seed=4)[0]]
    ids, mask = (x.cuda() for x in left_pad(sequences))
    kwargs = dict(attention_mask=mask, max_new_tokens=40, do_sample=False)
    greedy, how = _generate(model, ids, **kwargs)
    assert how == "graph"
    assert torch.equal(greedy, model.generate(ids, ramnet_decode_loop=False, **kwargs))
    for step in (0, 3, 20):  # stops at the first token, early, and after a host look (every 16 steps)
        eos = int(greedy[0, ids.shape[1] + step])
        stopped, how = _generate(model, ids, eos_token_id=eos, pad_token_id=0, **kwargs)
        assert how == "graph"
        assert torch.equal(stopped, model.generate(ids, eos_token_id=eos, pad_token_id=0, ramnet_decode_loop=False,
                                                   **kwargs))
    # sampling inside the graph: the same seed, the same tokens as the eager loop and as transformers'
    # (the graph's replays advance CUDA's generator as the eager draws do)
    sampling = dict(attention_mask=mask, max_new_tokens=40, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                    cache_implementation="static")
    runs = {}
    for loop in (None, "eager", False):
        torch.manual_seed(0)
        runs[loop], how = _generate(model, ids, ramnet_decode_loop=loop, **sampling)
        assert how == {None: "graph", "eager": "eager", False: None}[loop]
    assert torch.equal(runs[None], runs["eager"]) and torch.equal(runs[None], runs[False])
    # streaming from the graph loop: one put per step, the tokens generate returns
    streamer = Collect()
    out, how = _generate(model, ids[:1], attention_mask=mask[:1], max_new_tokens=40, do_sample=False,
                         streamer=streamer)
    assert how == "graph" and streamer.chunks[-1] == "end"
    assert streamer.chunks[1:-1] == out[:, ids.shape[1]:].T.tolist()


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_consecutive_calls_of_one_shape_capture_once_and_equal_the_eager_loop(dtype):
    """The kept graph: captured by the first call of a key, replayed by the next ones (other prompts,
    other lengths in the same bucket), each call's tokens the eager loop's; a returned cache holds the
    eager loop's state; a changed key captures another graph."""
    model = _model(dtype, short_conv_size=3)
    runs = [(random_ids(2, 7, seed=1), 40), (random_ids(2, 13, seed=2), 40), (random_ids(2, 5, seed=3), 100),
            (random_ids(2, 7, seed=1), 40)]
    for call, (prompt, n) in enumerate(runs):
        prompt = prompt.cuda()
        graph, how = _generate(model, prompt, max_new_tokens=n, do_sample=False, return_dict_in_generate=True)
        last = model._ramnet_decode_loop_last
        assert how == "graph" and last["captures"] == 1 and last["captured"] == (call == 0)
        assert last["reused"] == (call > 0) and (last["capture_s"] > 0) == (call == 0)
        eager = model.generate(prompt, max_new_tokens=n, do_sample=False, return_dict_in_generate=True,
                               ramnet_decode_loop="eager")
        assert torch.equal(graph.sequences, eager.sequences)
        for a, b in zip(decode_loop.cache_tensors(graph.past_key_values),
                        decode_loop.cache_tensors(eager.past_key_values)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(decode_loop.retained_loops(model)) == 2  # the graph loop and the eager loop, one each
    other, how = _generate(model, random_ids(3, 7).cuda(), max_new_tokens=40, do_sample=False)
    assert how == "graph" and model._ramnet_decode_loop_last["captured"]  # another batch: another graph
    held = model._ramnet_decode_loop_last["held_bytes"]
    assert held > 0
    assert model.clear_decode_graphs() == 3 and not decode_loop.retained_loops(model)
    _generate(model, random_ids(3, 7).cuda(), max_new_tokens=40, do_sample=False)
    assert model._ramnet_decode_loop_last["captured"]


@torch.no_grad()
def test_a_seeded_sampling_call_repeated_with_the_kept_graph_gives_the_same_tokens():
    """The kept graph reads the default CUDA generator's seed and offset at each replay: re-seeding before
    a later call (which only replays) draws the first call's tokens, which are the eager loop's and
    transformers'; another seed draws others; and the generator ends where the eager loop leaves it."""
    model = _model()
    sequences = [random_ids(1, 9, seed=2)[0], random_ids(1, 5, seed=3)[0], random_ids(1, 1, seed=4)[0]]
    ids, mask = (x.cuda() for x in left_pad(sequences))
    sampling = dict(attention_mask=mask, max_new_tokens=40, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    runs, states = [], []
    for call in range(3):
        torch.manual_seed(0)
        out, how = _generate(model, ids, **sampling)
        assert how == "graph" and model._ramnet_decode_loop_last["captured"] == (call == 0)
        runs.append(out)
        states.append(torch.cuda.get_rng_state())
    torch.manual_seed(0)
    eager, how = _generate(model, ids, ramnet_decode_loop="eager", **sampling)
    states.append(torch.cuda.get_rng_state())
    torch.manual_seed(0)
    hf, _ = _generate(model, ids, ramnet_decode_loop=False, cache_implementation="static", **sampling)
    assert all(torch.equal(run, eager) for run in runs) and torch.equal(eager, hf)
    assert all(torch.equal(state, states[-1]) for state in states)
    torch.manual_seed(1)
    assert not torch.equal(_generate(model, ids, **sampling)[0], eager)
    assert not model._ramnet_decode_loop_last["captured"]
    # unseeded consecutive calls draw on from where the generator is, as the eager loop does
    torch.manual_seed(0)
    pair = [_generate(model, ids, **sampling)[0] for _ in range(2)]
    torch.manual_seed(0)
    eager_pair = [_generate(model, ids, ramnet_decode_loop="eager", **sampling)[0] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(pair, eager_pair)) and not torch.equal(pair[0], pair[1])
