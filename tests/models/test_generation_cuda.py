"""`generate` on CUDA with `cache_implementation="static"` (the default there,
`STATIC_CACHE_BY_DEFAULT_ON_CUDA`): a `RAMNetStaticCache` and each decoding step
through transformers' auto-compilation (torch.compile, mode "reduce-overhead": the step captured in
a CUDA graph and replayed). Its tokens must be the eager loop's and the full forward's (skipped
without a GPU).

Run on a GPU machine with: python -m pytest -q -m cuda tests/models/test_generation_cuda.py
"""

import pytest
import torch

from ramnet.models import RAMNetStaticCache

from model_helpers import random_ids, tiny_model
from test_modeling_ramnet import greedy_without_cache, left_pad

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _model(dtype=torch.float32, **overrides):
    return tiny_model(dtype, **overrides).cuda()


@torch.no_grad()
@pytest.mark.parametrize("short_conv_size", [0, 3])
def test_the_graph_loop_gives_the_eager_loops_and_the_full_forwards_tokens(short_conv_size):
    model = _model(short_conv_size=short_conv_size)
    prompt = random_ids(2, 7).cuda()
    graph = model.generate(prompt, max_new_tokens=12, do_sample=False, return_dict_in_generate=True,
                           cache_implementation="static")
    assert isinstance(graph.past_key_values, RAMNetStaticCache)
    assert hasattr(model, "_compiled_call")  # generate compiled the step (the graph path)
    eager = model.generate(prompt, max_new_tokens=12, do_sample=False, disable_compile=True)
    dynamic = model.generate(prompt, max_new_tokens=12, do_sample=False, cache_implementation="dynamic")
    assert torch.equal(graph.sequences, eager) and torch.equal(graph.sequences, dynamic)
    assert torch.equal(graph.sequences, greedy_without_cache(model, prompt, 12))


@torch.no_grad()
def test_the_graph_loop_with_left_padding_stop_tokens_and_bf16():
    model = _model(torch.bfloat16)
    sequences = [random_ids(1, 9, seed=2)[0], random_ids(1, 5, seed=3)[0], random_ids(1, 1, seed=4)[0]]
    ids, mask = (x.cuda() for x in left_pad(sequences))
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, cache_implementation="static")
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
                                   top_k=20, top_p=0.9, disable_compile=compile_off, cache_implementation="static"))
    assert runs[0].shape == runs[1].shape
