"""RAM-Net models with hybrid and softmax-attention layers (`mixer_types`)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ramnet.layers import HybridRAMAttention, RAMAttention, SlidingWindowAttention
from ramnet.models import RAMNetCache, RAMNetConfig, RAMNetForCausalLM

import model_helpers as helpers
from model_helpers import VOCAB, random_ids

MIXED = ["hybrid", "sliding_attention", "full_attention", "ramnet"]
HYBRID = dict(num_hidden_layers=4, num_cape_heads=[4, 2, 0, 2], mixer_types=MIXED, window_size=3)


def tiny_config(**overrides):
    return helpers.tiny_config(**(HYBRID | overrides))


def tiny_model(dtype=torch.float64, **overrides):
    return helpers.tiny_model(dtype, **(HYBRID | overrides))


def test_mixer_types_pick_the_mixers():
    model = tiny_model(hybrid_blend="delayed_chunk", hybrid_mix="scalar", hybrid_fw="deltanet")
    mixers = [layer.attn for layer in model.model.layers]
    expected = [HybridRAMAttention, SlidingWindowAttention, SlidingWindowAttention, RAMAttention]
    assert [type(m) for m in mixers] == expected
    assert (mixers[0].blend, mixers[0].mix, mixers[0].fast_weight, mixers[0].window_size) == (
        "delayed_chunk", "scalar", "deltanet", 3,
    )
    assert mixers[0].cape == (True,) * 4 and mixers[3].cape == (True, True, False, False)
    assert (mixers[1].window_size, mixers[2].window_size) == (3, None)
    # the scalar mix: hidden -> two sigmoids per head, from zero biases (each weight 1/2 at x = 0)
    assert mixers[0].mix_proj.weight.shape == (2 * 4, 32) and torch.equal(mixers[0].mix_proj.bias, torch.zeros(8))
    # the default keeps every layer RAM-Net
    default = RAMNetConfig(num_hidden_layers=3, num_heads=4)
    assert default.mixer_types == ["ramnet"] * 3


def test_forward_backward_gives_finite_gradients_everywhere():
    model = tiny_model(torch.float32).train()
    ids = random_ids(2, 10)
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize(
    "blend, fast_weight",
    [
        ("synchronous", "ramnet"),
        ("delayed_stream", "ramnet"),
        ("delayed_chunk", "ramnet"),
        ("delayed_stream", "deltanet"),
    ],
)
@torch.no_grad()
def test_cached_generation_matches_full_forwards(blend, fast_weight):
    model = tiny_model(hybrid_blend=blend, hybrid_fw=fast_weight)
    ids = random_ids(2, 11)
    full = model(ids, use_cache=False).logits
    first = model(ids[:, :5], use_cache=True)
    second = model(ids[:, 5:], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full)
    assert isinstance(second.past_key_values, RAMNetCache) and second.past_key_values.get_seq_length() == 11

    prompt = ids[:, :4]
    generated = model.generate(prompt, max_new_tokens=7, do_sample=False)
    expected = prompt
    for _ in range(7):
        expected = torch.cat([expected, model(expected, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, expected)


@torch.no_grad()
def test_beam_search_with_cache_matches_without():
    model = tiny_model(hybrid_blend="delayed_stream")
    kwargs = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    prompt = random_ids(2, 5)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **kwargs))


@pytest.mark.parametrize("blend", ["synchronous", "delayed_chunk"])
@torch.no_grad()
def test_left_padded_batch_matches_sequences_alone(blend):
    model = tiny_model(hybrid_blend=blend)
    sequences = [random_ids(1, 8, seed=2)[0], random_ids(1, 4, seed=3)[0]]
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, 8 - len(seq) :], mask[row, 8 - len(seq) :] = seq, 1
    batch_logits = model(ids, attention_mask=mask).logits
    batch_generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)[:, 8:]
    for row, seq in enumerate(sequences):
        torch.testing.assert_close(batch_logits[row, 8 - len(seq) :], model(seq[None]).logits[0])
        alone = model.generate(seq[None], max_new_tokens=6, do_sample=False)[0, len(seq) :]
        assert torch.equal(batch_generated[row], alone)


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model(torch.float32, hybrid_blend="delayed_stream", hybrid_mix="scalar", rope_theta=500.0)
    ids = random_ids(2, 7)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = RAMNetForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.mixer_types == MIXED and loaded.config.hybrid_blend == "delayed_stream"
    assert loaded.model.layers[0].attn.rope_theta == 500.0
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


@pytest.mark.parametrize(
    "field, value, extra",
    [
        ("mixer_types", ["hybrid"] * 3, {}),  # one per layer needed
        ("mixer_types", ["ram"] * 4, {}),
        ("mixer_types", ["attention"] * 4, {}),  # transformers' names only: "full_attention"
        ("hybrid_blend", "delayed", {}),
        ("hybrid_mix", "gate", {}),
        ("hybrid_fw", "gla", {}),
        ("hybrid_deltanet_activation", "relu", {}),
        ("window_size", -1, {}),
        ("window_size", 0, {}),  # a sliding_attention layer needs a window
        ("window_size", 0, dict(mixer_types=["hybrid"] * 4, hybrid_blend="delayed_chunk")),
        ("rope_theta", 0.0, {}),
    ],
)
def test_config_rejects_bad_values(field, value, extra):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value}, **extra)


def test_window_zero_is_allowed_without_a_windowed_layer():
    config = tiny_config(mixer_types=["hybrid"] * 4, hybrid_blend="delayed_stream", window_size=0)
    assert config.window_size == 0


def test_deltanet_hybrids_use_the_papers_silu_by_default():
    model = tiny_model(hybrid_fw="deltanet")
    assert model.config.hybrid_deltanet_activation == "silu"
    assert model.model.layers[0].attn.memory.activation == "silu"
    # a config from a run's model settings (no transformers_version: not a saved config) too
    assert RAMNetConfig(mixer_types=["hybrid"] * 2, num_hidden_layers=2, hybrid_fw="deltanet").hybrid_deltanet_activation == "silu"


def without_field(directory, field):
    """Rewrite a saved config.json as it was before `field` existed."""
    path = directory / "config.json"
    saved = json.loads(path.read_text())
    assert field in saved  # save_pretrained writes every RAMNetConfig field
    del saved[field]
    path.write_text(json.dumps(saved))


@pytest.mark.parametrize("activation", ["silu", "identity"])
def test_deltanet_checkpoints_load_as_they_were_trained(tmp_path, activation):
    """A DeltaNet hybrid saved before `hybrid_deltanet_activation` existed computed without SiLU:
    it loads as "identity" and gives its logits; a checkpoint saved since keeps its stored map."""
    model = tiny_model(torch.float32, hybrid_fw="deltanet", hybrid_deltanet_activation=activation)
    ids = random_ids(2, 7)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    if activation == "identity":  # the only map a checkpoint from before the field can have
        without_field(tmp_path, "hybrid_deltanet_activation")
    loaded = RAMNetForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.hybrid_deltanet_activation == activation
    assert loaded.model.layers[0].attn.memory.activation == activation
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_scalar_mix_checkpoints_from_before_the_dynamic_mix_are_refused(tmp_path):
    """A checkpoint saved when the scalar mix was a static logit per head (its config.json lacks
    `hybrid_deltanet_activation`) would load with a freshly initialised mix_proj: refused."""
    model = tiny_model(torch.float32, hybrid_mix="scalar")
    model.save_pretrained(tmp_path)
    RAMNetForCausalLM.from_pretrained(tmp_path)  # saved since: loads
    without_field(tmp_path, "hybrid_deltanet_activation")
    with pytest.raises(ValueError, match=r"scalar mix became input-dependent.*mix_proj.bias = \[mix_logit, -mix_logit\]"):
        RAMNetForCausalLM.from_pretrained(tmp_path)
    # other mixes of that time are unchanged and still load
    vector = tiny_model(torch.float32, hybrid_mix="vector")
    vector.save_pretrained(tmp_path / "vector")
    without_field(tmp_path / "vector", "hybrid_deltanet_activation")
    assert RAMNetForCausalLM.from_pretrained(tmp_path / "vector").config.hybrid_mix == "vector"


def test_hybrid_output_norm_starts_small_and_other_norms_at_one():
    model = RAMNetForCausalLM(tiny_config())  # as built for training: float32, post_init's weights
    hybrid_layer, ramnet_layer = model.model.layers[0], model.model.layers[3]
    assert torch.equal(hybrid_layer.attn.o_norm.weight, torch.full((8,), 0.02))
    for norm in (hybrid_layer.attn_norm, hybrid_layer.mlp_norm, ramnet_layer.attn_norm, model.model.norm):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))


@pytest.mark.parametrize("complete", [True, False])
def test_loaded_hybrid_output_norm_keeps_its_trained_gain(tmp_path, complete):
    """Incomplete: a checkpoint missing another parameter of the hybrid layer, so that
    `_init_weights` runs on that layer while loading; the loaded gain must survive it."""
    model = tiny_model(torch.float32)
    trained = torch.linspace(0.5, 1.5, 8)
    with torch.no_grad():
        model.model.layers[0].attn.o_norm.weight.copy_(trained)
        model.model.layers[0].attn.q_log_scale.fill_(0.3)
    model.save_pretrained(tmp_path)
    if not complete:
        weights = load_file(tmp_path / "model.safetensors")
        del weights["model.layers.0.attn.q_log_scale"]
        save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = RAMNetForCausalLM.from_pretrained(tmp_path).model.layers[0].attn
    assert torch.equal(loaded.o_norm.weight, trained)
    assert torch.equal(loaded.q_log_scale, torch.full((4,), 0.3 if complete else 0.0))  # re-initialised if missing
