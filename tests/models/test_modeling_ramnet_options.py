"""RAM-Net with Gated DeltaNet's short convolution and output gate: the cache carries the convolution's
history, so chunked forwards, greedy generation and left-padded batches agree with full forwards."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError

from ramnet.layers.short_conv import ShortConvolution
from ramnet.models import RAMNetForCausalLM

from model_helpers import random_ids, tiny_config, tiny_model
from test_modeling_ramnet import greedy_without_cache, left_pad


def options_model():
    """short_conv_size 3 and the output gate, the convolutions moved off their identity start (which
    would make a lost history invisible)."""
    model = tiny_model(short_conv_size=3, output_gate=True)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ShortConvolution):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator, dtype=module.weight.dtype))
    return model


def test_every_ramnet_layer_gets_the_options_and_they_train():
    model = options_model().train()
    for layer in model.model.layers:
        assert isinstance(layer.attn.short_conv, ShortConvolution) and layer.attn.short_conv.size == 3
        assert layer.attn.g_proj is not None and layer.attn.o_norm is not None
    ids = random_ids(2, 10)
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_the_defaults_are_the_papers_mixer():
    layer = tiny_model().model.layers[0].attn
    assert layer.short_conv is None and layer.g_proj is None and layer.o_norm is None


@torch.no_grad()
def test_chunked_forward_with_cache_matches_one_forward():
    model, ids = options_model(), random_ids(2, 11)
    full = model(ids, use_cache=False).logits
    first = model(ids[:, :1], use_cache=True)  # shorter than the kernel: the history keeps its zeros
    second = model(ids[:, 1:6], past_key_values=first.past_key_values, use_cache=True)
    third = model(ids[:, 6:], past_key_values=second.past_key_values, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits, third.logits], 1), full)


@torch.no_grad()
def test_greedy_generate_and_left_padding_match_full_forwards():
    model = options_model()
    prompt = random_ids(2, 7)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), greedy_without_cache(model, prompt, 6))
    sequences = [random_ids(1, 6, seed=2)[0], random_ids(1, 2, seed=3)[0]]
    ids, mask = left_pad(sequences)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for row, seq in enumerate(sequences):
        assert torch.equal(batch[row, ids.shape[1]:], model.generate(seq[None], max_new_tokens=5, do_sample=False)[0, len(seq):])


def test_save_and_load_keeps_the_trained_convolution(tmp_path):
    model = options_model()
    model.save_pretrained(tmp_path)
    loaded = RAMNetForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    ids = random_ids(1, 8)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("field, value, error", [
    ("short_conv_size", 1, ValueError), ("short_conv_size", -2, ValueError), ("output_gate", 1, StrictDataclassFieldValidationError),  # the config's field types are strict
])
def test_config_rejects_bad_options(field, value, error):
    with pytest.raises(error, match=field):
        tiny_config(**{field: value})


def test_config_refuses_options_without_ramnet_layers():
    with pytest.raises(ValueError, match="short_conv_size"):
        tiny_config(short_conv_size=4, mixer_types=["sliding_attention"] * 3, window_size=4)


PER_HEAD_GAMMA = [0.0, 1.0, 4.0, 16.0]  # one per head of TINY's 4: no forgetting up to fast forgetting


def test_per_head_gamma_reaches_every_layer_and_survives_saving(tmp_path):
    model = tiny_model(gamma=PER_HEAD_GAMMA)
    for layer in model.model.layers:
        assert layer.attn.memory.spec(torch.zeros(1, dtype=torch.float64)).gamma.tolist() == PER_HEAD_GAMMA
    model.save_pretrained(tmp_path)
    assert RAMNetForCausalLM.from_pretrained(tmp_path).config.gamma == PER_HEAD_GAMMA
    ids = random_ids(2, 9)
    # Each head forgets at its own rate: the logits differ from every single shared gamma.
    for shared in set(PER_HEAD_GAMMA):
        assert not torch.allclose(tiny_model(gamma=shared)(ids).logits, model(ids).logits)


@torch.no_grad()
def test_per_head_gamma_decodes_as_full_forwards():
    model = tiny_model(gamma=PER_HEAD_GAMMA)
    prompt = random_ids(2, 7)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), greedy_without_cache(model, prompt, 6))


@pytest.mark.parametrize("gamma, message", [
    ([1.0, 2.0, 4.0], "one entry per head"), ([1.0, -1.0, 2.0, 3.0], "gamma entries"),
    ([1.0, float("nan"), 2.0, 3.0], "gamma entries"), (-0.5, "gamma"),
])
def test_config_rejects_bad_gamma(gamma, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(gamma=gamma)
