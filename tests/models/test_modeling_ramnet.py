import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache

from ramnet.models import RAMNetCache, RAMNetConfig, RAMNetForCausalLM, RAMNetModel
from ramnet.models.ramnet import paper_num_cape_heads
from ramnet.ops import RAMState

from model_helpers import VOCAB, random_ids, tiny_config, tiny_model


def test_forward_backward_gives_finite_gradients_everywhere():
    model = tiny_model(torch.float32).train()
    ids = random_ids(2, 12)
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 12, VOCAB)
    assert out.past_key_values is None  # training forwards build no state by default
    out.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    # the per-head temperatures start at e^0 = 1 and are trained
    attn = model.model.layers[0].attn
    assert torch.equal(attn.q_log_scale, torch.zeros_like(attn.q_log_scale))
    assert attn.q_log_scale.grad.abs().sum() > 0


def test_loss_is_shifted_cross_entropy():
    model = tiny_model(torch.float32)  # the loss is computed in fp32 whatever the model dtype
    ids = random_ids(2, 10)
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_logits_to_keep_and_hidden_states():
    model = tiny_model()
    ids = random_ids(2, 9)
    full = model(ids, output_hidden_states=True)
    assert len(full.hidden_states) == model.config.num_hidden_layers + 1
    last = model(ids, logits_to_keep=1)
    torch.testing.assert_close(last.logits, full.logits[:, -1:])


def test_chunked_forward_with_cache_matches_one_forward():
    model = tiny_model()
    ids = random_ids(2, 11)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :6], use_cache=True)
        cache = first.past_key_values
        assert isinstance(cache, RAMNetCache) and cache.get_seq_length() == 6
        second = model(ids[:, 6:], past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 11
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full)


def test_cache_argument_under_either_name():
    """transformers 5.24 passes the cache as `cache`, earlier releases as `past_key_values`."""
    model = tiny_model()
    ids = random_ids(2, 9)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = model(ids[:, :4], use_cache=True).past_key_values
        second = model(ids[:, 4:], cache=cache, use_cache=True).logits
        torch.testing.assert_close(second, full[:, 4:])
        with pytest.raises(ValueError, match="not both"):
            model(ids[:, 4:], cache=cache, past_key_values=cache)


def greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        logits = model(ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@torch.no_grad()
def test_greedy_generate_with_cache_matches_full_forwards():
    model = tiny_model()
    prompt = random_ids(2, 7)
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, greedy_without_cache(model, prompt, 8))
    # prefill took the prompt, then one token per step (the last sampled token is never fed)
    assert isinstance(out.past_key_values, RAMNetCache)
    assert out.past_key_values.get_seq_length() == 7 + 8 - 1


@torch.no_grad()
def test_beam_search_with_cache_matches_without():
    model = tiny_model()
    prompt = random_ids(2, 5)
    kwargs = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def left_pad(sequences, pad_id=0):
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = 1
    return ids, mask


@torch.no_grad()
def test_left_padded_batch_matches_sequences_alone():
    model = tiny_model()
    sequences = [random_ids(1, 9, seed=2)[0], random_ids(1, 5, seed=3)[0], random_ids(1, 1, seed=4)[0]]
    ids, mask = left_pad(sequences)
    batch_logits = model(ids, attention_mask=mask).logits
    batch_generated = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for row, seq in enumerate(sequences):
        alone = model(seq[None]).logits[0]
        torch.testing.assert_close(batch_logits[row, -len(seq) :], alone)
        generated_alone = model.generate(seq[None], max_new_tokens=8, do_sample=False)[0, len(seq) :]
        assert torch.equal(batch_generated[row, ids.shape[1] :], generated_alone)


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model(torch.float32)
    ids = random_ids(2, 8)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(name.endswith(".bin") for name in files)

    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, RAMNetConfig) and config.num_cape_heads == [4, 2, 0]
    for cls in (RAMNetForCausalLM, AutoModelForCausalLM):
        loaded = cls.from_pretrained(tmp_path).eval()
        assert type(loaded) is RAMNetForCausalLM
        # the CAPE switches are not in the checkpoint: they must come back from the config
        for original, restored in zip(model.model.layers, loaded.model.layers):
            assert restored.attn.cape == original.attn.cape
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, expected)
    assert type(AutoModel.from_pretrained(tmp_path)) is RAMNetModel


def test_word_embeddings_untied_by_default_and_tied_on_request():
    untied = tiny_model()
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    tied = tiny_model(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = random_ids(2, 10)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            # renamed in transformers 5.2x; the device image has 5.17
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model(ids, labels=ids).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_model_refuses_a_key_value_cache():
    model = RAMNetModel(tiny_config())
    with pytest.raises(TypeError, match="RAMNetCache"):
        model(random_ids(1, 4), past_key_values=DynamicCache())


def test_cache_holds_one_state_per_layer_and_follows_beams():
    cache = RAMNetCache()
    assert cache.get_state(1) is None and cache.get_seq_length() == 0
    state = RAMState(torch.arange(3.0).view(3, 1, 1, 1), torch.ones(3, 1, 1), torch.tensor([4, 5, 6]))
    cache.update_state(1, state, num_new_tokens=6)
    assert len(cache) == 2 and cache.get_state(0) is None and cache.get_seq_length(1) == 6
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert cache.get_state(1).offset.tolist() == [6, 6, 4]
    cache.batch_select_indices(torch.tensor([2]))
    assert cache.get_state(1).S.flatten().tolist() == [0.0]
    assert not cache.is_croppable and not cache.is_compileable
    with pytest.raises(RuntimeError):
        cache.crop(-1)


def test_default_cape_schedule():
    # the paper's 27 layers: every head in layers 1-4, half of them in layers 5-8, none after
    assert RAMNetConfig().num_cape_heads == [16] * 4 + [8] * 4 + [0] * 19 == paper_num_cape_heads(27, 16)
    # in proportion to depth: the small preset's 8 layers, the tiny preset's 4, 2 layers (half the heads of one)
    assert RAMNetConfig(num_hidden_layers=8, num_heads=8).num_cape_heads == [8, 4, 0, 0, 0, 0, 0, 0]
    assert RAMNetConfig(num_hidden_layers=4, num_heads=4).num_cape_heads == [4, 0, 0, 0]
    assert RAMNetConfig(num_hidden_layers=2, num_heads=5).num_cape_heads == [2, 0]
    # the absolute numbers stay available by name
    assert paper_num_cape_heads(10, 6) == [6] * 4 + [3] * 4 + [0] * 2
    # only RAM-Net layers get CAPE by default: not the hybrid's fast-weight memory, not attention
    mixed = RAMNetConfig(num_hidden_layers=8, num_heads=8, mixer_types=["hybrid", "ramnet"] + ["sliding_attention"] * 6)
    assert mixed.num_cape_heads == [0, 4, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_cape_heads", [4, 2]),  # one entry per layer needed
        ("num_cape_heads", [4, 5, 0]),  # more CAPE heads than heads
        ("num_cape_heads", [4, -1, 0]),
        ("num_heads", 0),
        ("hidden_size", -8),
        ("head_v_dim", 0),
        ("topk", 28),  # M = 3 ** 3 = 27
        ("gamma", -0.5),
        ("tau", 0.0),
        ("proxy_eps", 1.5),
        ("attn_mode", "fused"),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})


def test_paper_config_parameter_count():
    # Spec section 5: the projections and MLP give 340.7M parameters besides the input embedding.
    with torch.device("meta"):
        model = RAMNetForCausalLM(RAMNetConfig())
    assert abs(model.num_parameters(exclude_embeddings=True) - 340.7e6) <= 0.2e6
