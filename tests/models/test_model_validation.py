"""The model checks its inputs (issue 15, item 7): ids against the vocabulary, inputs_embeds'
width, logits_to_keep, masks (also when all ones) and empty prompts, each with a ValueError
naming the input."""

import pytest
import torch

from model_helpers import VOCAB, random_ids, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 5, -1])
def test_ids_outside_the_vocabulary(model, bad):
    ids = random_ids(2, 5)
    ids[1, 3] = bad
    with pytest.raises(ValueError, match=rf"input_ids must be in \[0, vocab_size={VOCAB}\), got the id {bad}"):
        model(ids)


def test_a_one_token_prompt_through_generate_is_checked_and_a_decoding_step_reads_nothing(model, monkeypatch):
    with pytest.raises(ValueError, match=rf"got the id {VOCAB}"):
        model.generate(torch.tensor([[VOCAB]]), max_new_tokens=2, do_sample=False)
    from ramnet.models.ramnet import modeling_ramnet

    calls = []
    real = modeling_ramnet.check_token_ids
    monkeypatch.setattr(modeling_ramnet, "check_token_ids", lambda ids, v: (calls.append(ids.shape), real(ids, v)))
    model.generate(random_ids(1, 3), max_new_tokens=4, do_sample=False)
    assert calls == [(1, 3), (1, 3)]  # the prompt, in prepare_inputs_for_generation and the forward; no step


def test_ids_at_the_ends_of_the_vocabulary_are_taken(model):
    model(torch.tensor([[0, VOCAB - 1]]))


@pytest.mark.parametrize("shape", [(2, 5, 31), (2, 5, 33), (2, 32)])
def test_inputs_embeds_of_the_wrong_shape(model, shape):
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[B, T, hidden_size=32\]"):
        model(inputs_embeds=torch.randn(*shape, dtype=torch.float64))


def test_float_ids_are_refused(model):
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor \[B, T\]"):
        model(random_ids(1, 4).double())


@pytest.mark.parametrize("keep", [-1, -3, True])
def test_negative_logits_to_keep(model, keep):
    with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0"):
        model(random_ids(1, 5), logits_to_keep=keep)


def test_logits_to_keep_still_keeps_the_last_positions(model):
    ids = random_ids(1, 5)
    assert model(ids, logits_to_keep=2).logits.shape[1] == 2 and model(ids).logits.shape[1] == 5


def test_empty_inputs_and_prompts(model):
    with pytest.raises(ValueError, match="input_ids must hold at least one token"):
        model(random_ids(2, 5)[:, :0])
    with pytest.raises(ValueError, match="inputs_embeds must hold at least one token"):
        model(inputs_embeds=torch.randn(1, 0, 32, dtype=torch.float64))
    for batch in (1, 2):  # batch 2 reached transformers' right-padding check first: an IndexError
        with pytest.raises(ValueError, match="generate needs a prompt of at least one token"):
            model.generate(random_ids(batch, 3)[:, :0], max_new_tokens=2)


def test_masks_are_checked_before_an_all_ones_mask_is_dropped(model):
    ids = random_ids(2, 5)
    for mask in (torch.ones(2, 4), torch.ones(3, 5), torch.ones(5)):
        with pytest.raises(ValueError, match=r"attention_mask must be \[B, T_total\]"):
            model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="looks like an additive mask"):
        model(ids, attention_mask=torch.zeros(2, 5).index_fill_(1, torch.tensor([0]), float("-inf")))
    with pytest.raises(ValueError, match="got the value 0.5"):
        model(ids, attention_mask=torch.full((2, 5), 0.5))
    torch.testing.assert_close(model(ids, attention_mask=torch.ones(2, 5)).logits, model(ids).logits)
