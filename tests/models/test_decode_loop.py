"""RAM-Net's decode loop (ramnet/models/ramnet/decode_loop.py) on the CPU, where its step runs eagerly: the
same tokens as transformers' loop (`ramnet_decode_loop=False`) and as the full forward, with left padding,
stop tokens, sampling and streaming; its sampler against transformers' warpers and direct computations;
the fallback to transformers' loop where the loop does not apply. The captured graph itself is checked in
tests/models/test_generation_cuda.py (skipped without a GPU)."""

import pytest
import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ramnet.layers import memories
from ramnet.models import RAMNetCache
from ramnet.models.ramnet import decode_loop
from ramnet.models.ramnet.decode_loop import DecodeLoop, Sampler, keep_top_k, keep_top_p, sample_from

from model_helpers import Collect, VOCAB, random_ids, tiny_model
from test_modeling_ramnet import greedy_without_cache, left_pad

STATIC = dict(cache_implementation="static")


@pytest.fixture(autouse=True)
def torch_step(monkeypatch):
    """The torch recurrent step in place of the fused kernel, which Triton's interpreter runs at about a
    second per layer and step; tests/layers/test_ram_attention_decode_step.py checks that the two agree."""
    monkeypatch.setattr(memories, "triton_runs_on", lambda device: False)


def generate(model, ids, **kwargs):
    """`model.generate` and whether it went through the decode loop."""
    model._ramnet_decode_loop_last = None
    out = model.generate(ids, **kwargs)
    return out, model._ramnet_decode_loop_last is not None


def _rows(seed=2):
    sequences = [random_ids(1, 9, seed=seed)[0], random_ids(1, 5, seed=seed + 1)[0], random_ids(1, 1, seed=seed + 2)[0]]
    return sequences, *left_pad(sequences)


def expected_with_eos(alone: list[torch.Tensor], eos: int, pad: int) -> torch.Tensor:
    """transformers' result from each row's own greedy tokens: cut after the first stop token, padded,
    trimmed to the row that stopped last (or ran to the end)."""
    cut = []
    for tokens in alone:
        hits = (tokens == eos).nonzero()
        cut.append(tokens[: int(hits[0]) + 1] if len(hits) else tokens)
    width = max(len(t) for t in cut)
    return torch.stack([torch.cat([t, torch.full((width - len(t),), pad)]) for t in cut])


@torch.no_grad()
def test_greedy_one_sequence_equals_transformers_loop_and_the_full_forward():
    model = tiny_model()  # fp64: the full forward's argmax far from ties
    prompt = random_ids(1, 7)
    fast, took = generate(model, prompt, max_new_tokens=20, do_sample=False, **STATIC)
    hf, took_hf = generate(model, prompt, max_new_tokens=20, do_sample=False, ramnet_decode_loop=False, **STATIC)
    assert took and not took_hf
    assert torch.equal(fast, hf) and torch.equal(fast, greedy_without_cache(model, prompt, 20))
    # max_length instead of max_new_tokens; and a single new token (the prefill's, no step)
    assert torch.equal(generate(model, prompt, max_length=12, do_sample=False, **STATIC)[0], fast[:, :12])
    assert torch.equal(generate(model, prompt, max_new_tokens=1, do_sample=False, **STATIC)[0], fast[:, :8])


@torch.no_grad()
@pytest.mark.parametrize("sync_every", [1, 3, 16])
def test_left_padded_batch_with_stop_tokens(monkeypatch, sync_every):
    monkeypatch.setattr(decode_loop, "SYNC_EVERY", sync_every)
    model = tiny_model()
    sequences, ids, mask = _rows()
    alone = [greedy_without_cache(model, seq[None], 12)[0, len(seq):] for seq in sequences]
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, **STATIC)
    fast, took = generate(model, ids, **kwargs)
    assert took and torch.equal(fast[:, ids.shape[1]:], torch.stack(alone))  # no stop token: max_new_tokens
    assert torch.equal(fast, model.generate(ids, ramnet_decode_loop=False, **kwargs))
    # stop tokens the rows produce at different steps: some rows stop early, padded; each choice of eos
    # below stops the batch at another step (or never: a token that only some rows make)
    for eos in {int(alone[0][3]), int(alone[1][0]), int(alone[2][6])}:
        fast, took = generate(model, ids, eos_token_id=eos, pad_token_id=0, **kwargs)
        hf = model.generate(ids, eos_token_id=eos, pad_token_id=0, ramnet_decode_loop=False, **kwargs)
        assert took and torch.equal(fast, hf)
        assert torch.equal(fast[:, ids.shape[1]:], expected_with_eos(alone, eos, pad=0))
    # a pad id of None: transformers pads with the (first) stop token
    eos = int(alone[0][3])
    fast = model.generate(ids, eos_token_id=[eos, VOCAB - 1], pad_token_id=None, **kwargs)
    assert torch.equal(fast, model.generate(ids, eos_token_id=[eos, VOCAB - 1], pad_token_id=None,
                                            ramnet_decode_loop=False, **kwargs))


@torch.no_grad()
def test_sampling_is_reproducible_and_draws_transformers_tokens():
    model = tiny_model(torch.float32)
    _, ids, mask = _rows()
    settings = [dict(temperature=0.9, top_k=20, top_p=0.9), dict(temperature=1.3), dict(top_k=5),
                dict(top_p=0.7, top_k=None)]
    for sampling in settings:
        runs = []
        for loop in (None, None, False):
            torch.manual_seed(7)
            out, took = generate(model, ids, attention_mask=mask, max_new_tokens=10, do_sample=True,
                                 ramnet_decode_loop=loop, **sampling, **STATIC)
            assert took == (loop is None)
            runs.append(out)
        assert torch.equal(runs[0], runs[1]), sampling  # the same seed, the same tokens
        assert torch.equal(runs[0], runs[2]), sampling  # and transformers' (the same draws)
    torch.manual_seed(7)
    other = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, **STATIC)
    assert not torch.equal(other, runs[0])  # sampling does sample
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **STATIC)
    one = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=1, temperature=0.7,
                         **STATIC)
    assert torch.equal(one, greedy)  # top_k=1 is greedy


def test_sampled_tokens_stay_in_the_top_k_with_the_filtered_distribution():
    torch.manual_seed(0)
    logits = torch.randn(8)
    draws = 40_000
    sampler = Sampler(True, [TemperatureLogitsWarper(0.8), TopKLogitsWarper(3)])
    tokens = sampler(logits.expand(draws, -1))
    top = set(torch.topk(logits, 3).indices.tolist())
    assert set(tokens.unique().tolist()) == top  # only the top 3 come, and each of them does
    expected = torch.zeros(8).index_put_((torch.tensor(sorted(top)),), torch.softmax(logits[sorted(top)] / 0.8, 0))
    frequencies = torch.bincount(tokens, minlength=8).float() / draws
    assert (frequencies - expected).abs().max() < 0.015  # about 4 standard deviations at 40,000 draws


def test_top_p_keeps_the_smallest_nucleus_of_mass_top_p():
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(64, 30, generator=generator, dtype=torch.float64) * 2
    for top_p in (0.05, 0.3, 0.6, 0.9, 0.99):
        kept = keep_top_p(scores, top_p) > -float("inf")
        for row, row_kept in zip(scores, kept):
            probs = row.softmax(0)
            order = probs.argsort(descending=True)
            # the most likely tokens up to and including the one at which their mass first reaches top_p
            size = int((probs[order].cumsum(0) < top_p).sum()) + 1
            direct = torch.zeros(30, dtype=torch.bool)
            direct[order[:size]] = True
            assert torch.equal(row_kept, direct), top_p
        assert torch.equal(keep_top_p(scores, top_p), TopPLogitsWarper(top_p)(None, scores))
    assert kept.sum(1).min() >= 1
    assert torch.equal(keep_top_p(scores, 0.05, min_tokens_to_keep=4) > -float("inf"),
                       TopPLogitsWarper(0.05, min_tokens_to_keep=4)(None, scores) > -float("inf"))
    assert (keep_top_p(scores, 0.05, min_tokens_to_keep=4) > -float("inf")).sum(1).min() == 4
    for k in (1, 5, 30, 40):
        assert torch.equal(keep_top_k(scores, k), TopKLogitsWarper(k)(None, scores))


def test_the_draw_is_torch_multinomials():
    probs = torch.softmax(torch.randn(16, 97), -1)
    torch.manual_seed(11)
    reference = torch.multinomial(probs, 1).squeeze(1)
    torch.manual_seed(11)
    assert torch.equal(sample_from(probs), reference)


@torch.no_grad()
@pytest.mark.parametrize("sync_every", [1, 4, 16])
def test_the_streamer_gets_the_generated_tokens_as_from_transformers(monkeypatch, sync_every):
    monkeypatch.setattr(decode_loop, "SYNC_EVERY", sync_every)
    model = tiny_model()
    _, ids, mask = _rows()
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False, **STATIC)
    for eos in (None, int(greedy[0, ids.shape[1] + 5])):
        kwargs = dict(attention_mask=mask, max_new_tokens=14, do_sample=False, eos_token_id=eos, pad_token_id=0,
                      **STATIC)
        for rows in (ids[:1], ids):  # one sequence (what text streamers take) and a batch
            fast_streamer, hf_streamer = Collect(), Collect()
            fast, took = generate(model, rows, streamer=fast_streamer, **{**kwargs, "attention_mask": mask[:len(rows)]})
            model.generate(rows, streamer=hf_streamer, ramnet_decode_loop=False,
                           **{**kwargs, "attention_mask": mask[:len(rows)]})
            assert took and fast_streamer.chunks == hf_streamer.chunks
            chunks = fast_streamer.chunks
            assert chunks[0] == rows.tolist() and chunks[-1] == "end" and chunks.count("end") == 1
            assert [chunk for chunk in chunks[1:-1]] == fast[:, rows.shape[1]:].T.tolist()  # one put per step


class NeverStop(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@torch.no_grad()
def test_the_fallback_to_transformers_loop_where_the_decode_loop_does_not_apply(monkeypatch):
    model = tiny_model()
    prompt = random_ids(2, 5)
    base = dict(max_new_tokens=5, do_sample=False, **STATIC)
    cases = [
        dict(num_beams=3),  # beam search: not _sample
        dict(num_beams=3, num_return_sequences=2),
        dict(repetition_penalty=1.3),  # a logits processor the loop has no form of
        dict(logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2)])),
        dict(stopping_criteria=StoppingCriteriaList([NeverStop()])),  # a stopping criterion of the user's
        dict(return_dict_in_generate=True, output_scores=True),  # scores asked for
        dict(prefill_chunk_size=2),  # chunked prefill
        dict(cache_implementation="dynamic"),  # not the static cache
        dict(ramnet_decode_loop=False),  # turned off
    ]
    for case in cases:
        kwargs = {**base, **case}
        out, took = generate(model, prompt, **kwargs)
        assert not took, case
        reference = model.generate(prompt, **{**kwargs, "ramnet_decode_loop": False})
        sequences = out.sequences if case.get("return_dict_in_generate") else out
        assert torch.equal(sequences, reference.sequences if case.get("return_dict_in_generate") else reference)
    # the default can be turned off for every call
    monkeypatch.setattr(decode_loop, "DECODE_LOOP_BY_DEFAULT", False)
    assert not generate(model, prompt, **base)[1]
    assert generate(model, prompt, ramnet_decode_loop="eager", **base)[1]  # asked for: taken anyway
    with pytest.raises(ValueError, match="ramnet_decode_loop"):
        model.generate(prompt, ramnet_decode_loop="fast", **base)


@torch.no_grad()
def test_a_returned_cache_has_seen_transformers_steps():
    model = tiny_model()
    sequences, ids, mask = _rows()
    eos = int(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, **STATIC)[0, ids.shape[1] + 2])
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0,
                  return_dict_in_generate=True, **STATIC)
    fast, took = generate(model, ids, **kwargs)
    hf = model.generate(ids, ramnet_decode_loop=False, **kwargs)
    assert took and torch.equal(fast.sequences, hf.sequences)
    fast_cache, hf_cache = fast.past_key_values, hf.past_key_values
    assert fast_cache.get_seq_length() == hf_cache.get_seq_length() == fast.sequences.shape[1] - 1
    for ours, theirs in zip(fast_cache.layers, hf_cache.layers):
        for a, b in zip(ours.state, theirs.state):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@torch.no_grad()
def test_one_step_of_the_loop_traces_into_one_graph_without_host_reads():
    """What the CUDA graph captures, checked on the CPU: `DecodeLoop.step` (model, sampler, stop tokens,
    buffer writes) traces with fullgraph=True, so it reads nothing on the host and depends on no Python
    value that changes between steps (one trace serves every step); and the traced steps decode as the
    eager ones."""
    torch._dynamo.reset()
    model = tiny_model(torch.float32, short_conv_size=3)
    _, ids, mask = _rows()
    loops = []
    for _ in range(2):
        cache = model.new_cache("static")
        logits = model(ids, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1]
        sampler = Sampler(True, [TemperatureLogitsWarper(0.9), TopKLogitsWarper(10), TopPLogitsWarper(0.9)])
        loop = DecodeLoop(model, cache, 3, 8, sampler, torch.tensor([5, 6]), torch.tensor(0), ids.device)
        torch.manual_seed(0)
        loop.choose(logits)
        loops.append(loop)
    counters = torch._dynamo.utils.counters
    counters.clear()
    traced = torch.compile(loops[0].step, fullgraph=True, backend="eager")
    for _ in range(6):
        state = torch.random.get_rng_state()
        traced()
        torch.random.set_rng_state(state)
        loops[1].step()
    assert counters["stats"]["unique_graphs"] == 1
    for a, b in zip(loops[0]._buffers(), loops[1]._buffers()):
        torch.testing.assert_close(a, b)
    assert int(loops[0].step_index) == 7
    torch._dynamo.reset()


@torch.no_grad()
def test_ramnet_generate_streams_through_the_decode_loop_and_stops_when_the_caller_leaves(monkeypatch):
    from ramnet.lm.generate import generate_ids

    model = tiny_model(torch.float32)
    prompt = random_ids(1, 6)[0].tolist()
    greedy = model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, ramnet_decode_loop=False,
                            **STATIC)[0, 6:].tolist()
    runs = []
    loop = DecodeLoop.run
    monkeypatch.setattr(DecodeLoop, "run", lambda self, *a, **k: runs.append(1) or loop(self, *a, **k))
    # the default cache on the CPU is the dynamic one; a static cache takes the decode loop
    assert list(generate_ids(model, prompt, 30, temperature=0, cache=model.new_cache("static"))) == greedy
    assert list(generate_ids(model, prompt, 30, temperature=0, eos_token_id=greedy[4],
                             cache=model.new_cache("static"))) == greedy[:greedy.index(greedy[4])]
    sampled = [list(generate_ids(model, prompt, 10, temperature=0.9, seed=3, cache=model.new_cache(cache)))
               for cache in ("static", "dynamic")]
    assert sampled[0] == sampled[1]
    assert len(runs) == 3
    monkeypatch.setattr(decode_loop, "SYNC_EVERY", 4)
    tokens = generate_ids(model, prompt, 10_000, temperature=0, cache=model.new_cache("static"))
    assert next(tokens) == greedy[0]
    tokens.close()  # the generation thread stops at its streamer's next put, and close returns after it


# --- the loops kept between generate calls (decode_loop.retained_loops): the key, reuse, the cache copies


def _filled_cache(model, ids):
    cache = model.new_cache("static")
    model(ids, cache=cache, use_cache=True)
    return cache


@torch.no_grad()
def test_the_compiled_step_gives_the_eager_steps_tokens():
    """`ramnet_decode_loop="compiled"`: the loop's model step through torch.compile (on the CPU without a
    graph), the same greedy tokens as the eager step's, for a batch with a left-padded row."""
    from ramnet.models.ramnet.decode_loop import next_logits, retained_loops

    model = tiny_model(torch.float32)
    _, ids, mask = _rows()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, **STATIC)
    eager, took_eager = generate(model, ids, ramnet_decode_loop="eager", **kwargs)
    compiled, took_compiled = generate(model, ids, ramnet_decode_loop="compiled", **kwargs)
    assert took_eager and took_compiled and model._ramnet_decode_loop_last["compiled"]
    assert torch.equal(compiled, eager)
    steps = sorted(loop.next_logits is next_logits for loop in retained_loops(model).values())
    assert steps == [False, True]  # two loops kept: the eager step's, and the compiled one


@torch.no_grad()
def test_the_compiled_step_of_a_bf16_model_gives_the_eager_steps_bits(monkeypatch):
    """bf16: inductor's fused kernels keep intermediates in fp32 unless told to round as eager does
    (`compile_step`); without that the logits differ from the first step (4e-3 here) and the difference grows
    through the state. The torch step stands in for the Triton kernel, which the interpreter cannot trace."""
    from ramnet.models.ramnet.decode_loop import compile_step

    monkeypatch.setattr(memories, "triton_runs_on", lambda device: False)
    torch._dynamo.reset()
    model = tiny_model(torch.bfloat16, hidden_size=128, num_heads=4, head_v_dim=16, intermediate_size=256)
    ids = random_ids(2, 14)
    cache, reference = model.new_cache("static"), RAMNetCache()
    model(ids[:, :5], cache=cache, use_cache=True)
    model(ids[:, :5], cache=reference, use_cache=True)
    step = compile_step(model)
    for t in range(5, 14):
        compiled = step(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True, logits_to_keep=1).logits
        eager = model(input_ids=ids[:, t:t + 1], cache=reference, use_cache=True, logits_to_keep=1).logits
        assert compiled.dtype == torch.bfloat16 and torch.equal(compiled, eager), t
    torch._dynamo.reset()


@torch.no_grad()
def test_the_loop_key_and_the_rounded_output_length():
    from ramnet.models.ramnet.decode_loop import loop_key, token_capacity

    assert [token_capacity(n) for n in (1, 2, 255, 256, 257, 512, 1000, 5000)] == \
        [256, 256, 256, 256, 512, 512, 1024, 8192]
    model = tiny_model(torch.float32)
    ids = random_ids(2, 5)
    cache = _filled_cache(model, ids)
    warpers = [TemperatureLogitsWarper(0.9), TopKLogitsWarper(10), TopPLogitsWarper(0.9)]
    eos, pad = torch.tensor([5, 6]), torch.tensor(0)

    def key(cache=cache, batch=2, n=100, do_sample=True, processors=warpers, eos=eos, pad=pad, graph=True,
            compiled=False):
        return loop_key(model, cache, batch, n, Sampler(do_sample, processors).key, eos, pad, graph, compiled)

    base = key()
    assert key() == base and key(n=256) == base and key(n=1) == base  # one bucket of output lengths
    assert key(cache=_filled_cache(model, random_ids(2, 11))) == base  # the prompt's length is not in it
    same_warpers = [TemperatureLogitsWarper(0.9), TopKLogitsWarper(10), TopPLogitsWarper(0.9)]
    assert key(eos=torch.tensor([5, 6])) == base and key(processors=same_warpers) == base
    changed = [
        key(n=257), key(do_sample=False), key(processors=[]), key(processors=warpers[:2]),
        key(processors=[TemperatureLogitsWarper(0.8), *warpers[1:]]),
        key(processors=[warpers[0], TopKLogitsWarper(11), warpers[2]]),
        key(processors=[*warpers[:2], TopPLogitsWarper(0.9, min_tokens_to_keep=2)]),
        key(processors=[warpers[1], warpers[0], warpers[2]]),  # the order of the warpers
        key(eos=torch.tensor([5])), key(eos=None, pad=None), key(pad=torch.tensor(1)), key(graph=False),
        key(compiled=True),
        key(cache=_filled_cache(model, random_ids(3, 5)), batch=3),
    ]
    assert all(k != base for k in changed) and len(set(changed)) == len(changed)
    other = tiny_model(torch.float32, short_conv_size=3)  # another cache layout (and other weights)
    assert loop_key(other, _filled_cache(other, ids), 2, 100, Sampler(True, warpers).key, eos, pad, True) != base
    model.double()  # new weights: another key
    assert key(cache=_filled_cache(model, ids)) != base


@torch.no_grad()
def test_a_second_call_of_the_same_shape_reuses_the_loop_and_a_changed_key_builds_another(monkeypatch):
    monkeypatch.setattr(decode_loop, "MAX_RETAINED_LOOPS", 2)
    built = []
    init = DecodeLoop.__init__
    monkeypatch.setattr(DecodeLoop, "__init__", lambda self, *a, **k: built.append(self) or init(self, *a, **k))
    model = tiny_model()
    _, ids, mask = _rows()
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, **STATIC)
    first, took = generate(model, ids, **kwargs)
    assert took and len(built) == 1 and not model._ramnet_decode_loop_last["reused"]
    assert model._ramnet_decode_loop_last["held_bytes"] > 0
    for prompt, prompt_mask in ((ids, mask), (random_ids(3, 4, seed=9), torch.ones(3, 4, dtype=torch.long))):
        for n in (12, 30, 1):  # the same bucket of output lengths, another prompt (length)
            fast, took = generate(model, prompt, **(kwargs | dict(attention_mask=prompt_mask, max_new_tokens=n)))
            assert took and len(built) == 1 and model._ramnet_decode_loop_last["reused"]
            hf = model.generate(prompt, ramnet_decode_loop=False, **(kwargs | dict(attention_mask=prompt_mask,
                                                                                    max_new_tokens=n)))
            assert torch.equal(fast, hf)
    assert built[0].runs == 7 and list(decode_loop.retained_loops(model).values()) == built
    # a changed key builds another loop: the batch, stop tokens, a longer output; two are kept
    eos = int(first[0, ids.shape[1] + 2])
    for change in (dict(input_ids=ids[:2], attention_mask=mask[:2]), dict(eos_token_id=eos, pad_token_id=0),
                   dict(max_new_tokens=300)):
        call = kwargs | change
        prompt = call.pop("input_ids", ids)
        fast, took = generate(model, prompt, **call)
        assert took and not model._ramnet_decode_loop_last["reused"]
        assert torch.equal(fast, model.generate(prompt, ramnet_decode_loop=False, **call))
    assert len(built) == 4 and list(decode_loop.retained_loops(model).values()) == built[2:]  # least recent dropped
    generate(model, ids, **kwargs)  # the first key again: dropped, so built anew
    assert len(built) == 5 and not model._ramnet_decode_loop_last["reused"]
    assert model.clear_decode_graphs() == 2 and not decode_loop.retained_loops(model)
    generate(model, ids, **kwargs)
    assert len(built) == 6
    import copy
    assert not decode_loop.retained_loops(copy.deepcopy(model))  # a copy keeps no graphs of this model
    model.float()  # a move drops them
    assert not decode_loop.retained_loops(model)


@torch.no_grad()
def test_a_reused_loop_samples_the_seeded_tokens_again():
    model = tiny_model(torch.float32)
    _, ids, mask = _rows()
    sampling = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=0.9, top_k=20, top_p=0.9,
                    **STATIC)
    runs = []
    for loop in (None, None, None, False):
        torch.manual_seed(7)
        runs.append(generate(model, ids, ramnet_decode_loop=loop, **sampling)[0])
        assert model._ramnet_decode_loop_last is None or model._ramnet_decode_loop_last["reused"] == (len(runs) > 1)
    assert all(torch.equal(run, runs[0]) for run in runs[1:])


@torch.no_grad()
def test_the_returned_cache_is_right_when_the_loop_is_reused():
    model = tiny_model()
    sequences, ids, mask = _rows()
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, **STATIC)
    eos = int(greedy[0, ids.shape[1] + 2])
    passed = dict(max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True)
    kwargs = passed | STATIC
    for call, (prompt, prompt_mask) in enumerate(((ids, mask), (random_ids(3, 6, seed=5), None), (ids, mask))):
        fast, took = generate(model, prompt, attention_mask=prompt_mask, **kwargs)
        assert took and model._ramnet_decode_loop_last["reused"] == (call > 0)
        hf = model.generate(prompt, attention_mask=prompt_mask, ramnet_decode_loop=False, **kwargs)
        assert torch.equal(fast.sequences, hf.sequences)
        fast_cache, hf_cache = fast.past_key_values, hf.past_key_values
        assert fast_cache.get_seq_length() == hf_cache.get_seq_length() == fast.sequences.shape[1] - 1
        for ours, theirs in zip(fast_cache.layers, hf_cache.layers):
            for a, b in zip(ours.state, theirs.state):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        loop = next(iter(decode_loop.retained_loops(model).values()))
        assert all(a.data_ptr() != b.data_ptr() for a, b in zip(decode_loop.cache_tensors(fast_cache),
                                                                decode_loop.cache_tensors(loop.cache)))
    # a cache the caller passed in, decoded with a kept loop, ends in transformers' state too
    mine, theirs = model.new_cache("static"), model.new_cache("static")
    out = model.generate(ids, attention_mask=mask, cache=mine, **passed)
    hf = model.generate(ids, attention_mask=mask, cache=theirs, ramnet_decode_loop=False, **passed)
    assert model._ramnet_decode_loop_last["reused"] and torch.equal(out.sequences, hf.sequences)
    for a, b in zip(decode_loop.cache_tensors(mine), decode_loop.cache_tensors(theirs)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_a_loop_in_use_is_not_shared():
    class Model:  # what acquire_loop needs of a model: a __dict__
        pass

    class Loop:
        def __init__(self):
            self.lock, self.released = __import__("threading").Lock(), False

        def release(self):
            self.released = True

    model = Model()
    first, reused, kept = decode_loop.acquire_loop(model, "k", Loop)
    assert not reused and kept
    second, reused, kept = decode_loop.acquire_loop(model, "k", Loop)  # first is locked: another thread's
    assert second is not first and not reused and not kept
    first.lock.release()
    third, reused, kept = decode_loop.acquire_loop(model, "k", Loop)
    assert third is first and reused and kept
    third.lock.release()
    assert decode_loop.clear_loops(model) == 1 and first.released


def test_cuda_takes_the_loop_by_default_only_once_it_is_turned_on(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(decode_loop, "BY_DEFAULT_ON_CUDA", False)
    assert decode_loop.default_choice(None, cuda) is False and decode_loop.default_choice(None, cpu) is None
    for asked in (True, False, "graph", "eager"):  # what the caller asks for always stands
        assert decode_loop.default_choice(asked, cuda) == asked
    monkeypatch.setattr(decode_loop, "BY_DEFAULT_ON_CUDA", True)
    assert decode_loop.default_choice(None, cuda) is None
