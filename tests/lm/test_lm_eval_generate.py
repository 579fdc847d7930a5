"""Strided perplexity, streaming generation and the data/train/eval/generate command lines."""

import json
import math

import pytest
import torch
from transformers import DynamicCache
from lm_helpers import one_thread, prepared_data, tiny_config, write_corpus  # noqa: F401  (autouse fixture)

from ramnet.cli import main
from ramnet.lm.evaluate import load, perplexity, stream_nll, windows
from ramnet.lm.generate import generate_ids, sampling_settings, state_bytes, stream_text
from ramnet.lm.train import train
from ramnet.models import RAMNetCache


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    data = prepared_data(tmp_path_factory)
    out = tmp_path_factory.mktemp("lm_run")
    return train(tiny_config(data, out, "max_steps=20", "eval_interval=0", "save_interval=0"), progress=False)["checkpoint"]


@pytest.mark.parametrize("n, context, stride", [(10, 4, 2), (10, 4, 4), (9, 4, 3), (3, 8, 4), (100, 16, 1)])
def test_windows_score_every_token_once_with_enough_context(n, context, stride):
    spans = windows(n, context, stride)
    scored = [t for b, e, s in spans for t in range(s, e)]
    assert scored == list(range(1, n))
    for b, e, s in spans:
        assert e - b <= context and s - b == min(s, max(1, context - stride))


def test_strided_nll_matches_a_direct_computation(ckpt):
    model, _ = load(ckpt, torch.device("cpu"))
    ids = torch.randint(0, 512, (50,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[None, :-1]).logits[0].float(), -1)
    full = -logp.gather(-1, ids[1:, None]).sum().item()
    nll, count = stream_nll(model, ids, context=64, stride=32, batch_size=4)  # one window: the whole stream
    assert count == 49 and nll == pytest.approx(full, rel=1e-5)
    # short windows: the batched, masked computation equals one forward per window
    spans = windows(50, 10, 10)
    nll10, count10 = stream_nll(model, ids, context=10, stride=10, batch_size=3)
    direct = 0.0
    with torch.no_grad():
        for b, e, s in spans:
            lp = torch.log_softmax(model(input_ids=ids[None, b : e - 1]).logits[0].float(), -1)
            direct -= lp[s - b - 1 :].gather(-1, ids[s:e, None]).sum().item()
    assert count10 == 49 and nll10 == pytest.approx(direct, rel=1e-5)
    with pytest.raises(ValueError, match="--stride"):
        windows(10, 4, 5)


def test_perplexity_on_held_out_documents(ckpt, tmp_path):
    corpus = str(write_corpus(tmp_path / "corpus"))
    result = perplexity(ckpt, source=corpus, held_out_every=10, progress=False)
    assert result["context"] == 32 and result["stride"] == 16  # the training length by default
    assert result["ppl"] == pytest.approx(math.exp(result["loss"])) and 1 < result["ppl"] < 512
    capped = perplexity(ckpt, source=corpus, max_tokens=100, context=16, stride=16, progress=False)
    assert capped["tokens"] == 99


def test_generation_is_greedy_consistent_with_hf_generate_and_keeps_a_constant_state(ckpt):
    model, tok = load(ckpt, torch.device("cpu"))
    prompt = tok("The for statement", add_special_tokens=False).input_ids
    cache = RAMNetCache()
    sizes, ours = [], []
    for token in generate_ids(model, prompt, 40, temperature=0, cache=cache):
        ours.append(token)
        sizes.append(state_bytes(cache))
    assert len(ours) > 0 and len(set(sizes)) == 1 and sizes[0] > 0
    hf = model.generate(torch.tensor([prompt]), max_new_tokens=len(ours), do_sample=False, eos_token_id=None, pad_token_id=0)
    assert hf[0, len(prompt):].tolist() == ours
    text = "".join(stream_text(model, tok, "The for statement", 30, temperature=0.8, seed=1, top_k=20, top_p=0.9))
    assert text == "".join(stream_text(model, tok, "The for statement", 30, temperature=0.8, seed=1, top_k=20, top_p=0.9))


def test_sampling_settings_and_filters(ckpt):
    # generate's own sampler now (the hand-written one is gone): the options map onto its arguments,
    # a filter that is off is None, and filters that keep one token leave the greedy tokens.
    assert sampling_settings(0, 50, 0.9) == dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    assert sampling_settings(0.7, 0, 1.0) == dict(do_sample=True, temperature=0.7, top_k=None, top_p=None)
    assert sampling_settings(1, 2, 0.5) == dict(do_sample=True, temperature=1.0, top_k=2, top_p=0.5)
    model, tok = load(ckpt, torch.device("cpu"))
    prompt = tok("Return", add_special_tokens=False).input_ids
    greedy = list(generate_ids(model, prompt, 6, temperature=0))
    assert list(generate_ids(model, prompt, 6, temperature=1.0, top_k=1, seed=3)) == greedy
    assert list(generate_ids(model, prompt, 6, temperature=1.0, top_k=0, top_p=1e-6, seed=4)) == greedy
    assert list(generate_ids(model, prompt, 0)) == []
    with pytest.raises(ValueError, match="temperature"):
        next(generate_ids(None, [1], 1, temperature=-1))
    with pytest.raises(ValueError, match="the prompt is empty"):
        next(generate_ids(model, [], 1))


def test_stopping_early_and_errors_in_the_generation_thread(ckpt):
    model, tok = load(ckpt, torch.device("cpu"))
    prompt = tok("Return", add_special_tokens=False).input_ids
    greedy = list(generate_ids(model, prompt, 8, temperature=0))
    # the first greedy token as the stop token: nothing comes out, and the stop token never does
    assert list(generate_ids(model, prompt, 8, temperature=0, eos_token_id=greedy[0])) == []
    later = greedy[3]
    stopped = list(generate_ids(model, prompt, 8, temperature=0, eos_token_id=later))
    assert stopped == greedy[: greedy.index(later)]
    tokens = generate_ids(model, prompt, 1000, temperature=0)
    assert next(tokens) == greedy[0]
    tokens.close()  # leaving early stops the generation thread, and returns once it has stopped
    with pytest.raises(TypeError, match="RAMNetCache"):  # raised in generate's thread, re-raised here
        next(generate_ids(model, prompt, 3, cache=DynamicCache()))


def test_an_empty_prompt_starts_from_bos_or_is_refused(ckpt):
    model, tok = load(ckpt, torch.device("cpu"))
    assert tok.bos_token_id is not None  # the project's tokenizers: <|endoftext|>, as every document follows one
    assert len(list(stream_text(model, tok, "", 3, temperature=0))) == 3
    tok.bos_token = None
    with pytest.raises(ValueError, match="the prompt is empty and the tokenizer has no BOS token"):
        next(stream_text(model, tok, "", 3))


def test_command_lines(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = write_corpus(tmp_path / "corpus", 10)
    assert main(["data", "prepare", "--source", str(corpus), "--out", "d", "--vocab-size", "300", "--val-every", "5"]) == 0
    assert "unigram entropy" in capsys.readouterr().out
    assert main(["train", "--quiet", "data=d", "out_dir=r", "max_steps=2", "seq_len=16", "batch_size=2", "micro_batch_size=2",
                 "eval_interval=0", "report_to=[]", "device=cpu", "model.hidden_size=32", "model.num_hidden_layers=1",
                 "model.num_heads=2", "model.head_v_dim=8", "model.num_partitions=2", "model.partition_dim=4",
                 "model.topk=2", "model.intermediate_size=32"]) == 0
    assert "train loss" in capsys.readouterr().out and (tmp_path / "r" / "checkpoint-000002").is_dir()
    assert main(["eval", "ppl", "--model", str(ckpt), "--data", str(corpus), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"] > 0
    assert main(["generate", "--model", str(ckpt), "--prompt", "Return", "--max-new-tokens", "5", "--seed", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Return") and "recurrent state" in captured.err
    assert main(["eval", "ppl", "--model", str(tmp_path / "none")]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "lr=x"]) == 2
    assert "`lr`" in capsys.readouterr().err
