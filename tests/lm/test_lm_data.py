"""Corpus sources, data preparation (shards, EOS separators, held-out split, unigram entropy),
training windows, and the training config (presets, files, overrides)."""

import importlib.util
import json
import math
import sys
import sysconfig
import types
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from lm_helpers import one_thread, prepared_data, write_corpus  # noqa: F401  (autouse fixture)

from ramnet.lm.config import PRESETS, TINY_MODELS, TrainConfig, load_config, parse_override
from ramnet.lm.corpus import documents, held_out, python_docs
from ramnet.lm.data import TokenData, Windows, default_data_dir, prepare
from ramnet.lm.tokenizer import train_bpe


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_data(tmp_path_factory)


def test_builtin_corpus_is_real_text_shipped_with_python():
    from pydoc_data.topics import topics

    docs = python_docs()
    first = list(islice(docs, 3))  # pydoc topics, sorted by name
    assert first == [topics[k] for k in sorted(topics)[:3]] and all(len(d.split()) > 20 for d in first)
    module_doc = next(islice(docs, len(topics) - 3, None))  # then the first module's docstrings
    assert len(module_doc.split()) >= 20 and module_doc not in topics.values()


def test_builtin_code_corpus_is_the_standard_library_source():
    docs = list(documents("python-stdlib"))
    assert len(docs) > 500 and sum(map(len, docs)) > 5_000_000  # big enough for a GPU-sized run
    source = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "__init__.py").read_text()
    assert source in docs and json.__doc__ in source


def test_prepare_writes_shards_with_eos_separators_and_a_held_out_split(data, tmp_path):
    meta = json.loads((data / "meta.json").read_text())
    tok = TokenData(data).tokenizer()
    docs = list(documents(str(write_corpus(tmp_path / "corpus"))))
    assert meta["vocab_size"] == len(tok) == 512 and meta["dtype"] == "uint16"
    train_docs = [d for i, d in enumerate(docs) if not held_out(i, 10)]
    val_docs = [d for i, d in enumerate(docs) if held_out(i, 10)]
    assert meta["splits"]["train"]["documents"] == len(train_docs) == 36 and meta["splits"]["val"]["documents"] == 4
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        tokens = np.concatenate(TokenData(data).shards[split])
        expected = [t for d in split_docs for t in tok(d, add_special_tokens=False).input_ids + [tok.eos_token_id]]
        assert tokens.tolist() == expected
    counts = np.bincount(np.concatenate(TokenData(data).shards["train"]).astype(np.int64), minlength=512)
    p = counts[counts > 0] / counts.sum()
    assert meta["unigram_entropy"] == pytest.approx(-(p * np.log(p)).sum())


def test_prepare_caps_tokens_splits_shards_and_reads_jsonl(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"body": f"Document number {i} says hello to the world."}) + "\n" for i in range(50)))
    meta = prepare(tmp_path / "out", source=str(corpus), text_column="body", vocab_size=300, val_every=0,
                   max_tokens=100, shard_tokens=40, progress=False)
    train = meta["splits"]["train"]
    assert train["tokens"] == 100 and [n for _, n in train["shards"]] == [40, 40, 20]
    assert meta["splits"]["val"]["tokens"] == 0
    assert not (tmp_path / "out.tmp").exists()
    with pytest.raises(ValueError, match="already holds"):
        prepare(tmp_path / "out", source=str(corpus), progress=False)
    with pytest.raises(ValueError, match="'text'"):
        prepare(tmp_path / "other", source=str(corpus), progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    with pytest.raises(ValueError, match="gave no training text"):  # fails after the shards were opened
        prepare(tmp_path / "none", source=str(tmp_path / "empty"), vocab_size=300, progress=False)
    assert not (tmp_path / "other.tmp").exists() and not (tmp_path / "none.tmp").exists()  # a failed prepare cleans up
    assert not (tmp_path / "other").exists() and not (tmp_path / "none").exists()


def test_prepare_with_a_hugging_face_tokenizer_file(tmp_path, data):
    tok_file = data / "tokenizer" / "tokenizer.json"
    meta = prepare(tmp_path / "out", source=str(write_corpus(tmp_path / "c", 5)), tokenizer=str(tok_file), progress=False)
    assert meta["vocab_size"] == 512 and meta["tokenizer"] == str(tok_file)


def test_hugging_face_sources_are_streamed(monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"page": "first article"}, {"page": "second article"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert list(documents("wikitext-103", split="test")) == ["first article", "second article"]
    assert calls == [("EleutherAI/wikitext_document_level", "wikitext-103-raw-v1", "test", True)]
    with pytest.raises(ValueError, match="--text-column"):
        list(documents("hf:some/dataset:cfg"))
    assert calls[-1] == ("some/dataset", "cfg", "train", True)


def test_unknown_sources_and_small_vocabularies_are_refused(tmp_path):
    with pytest.raises(ValueError, match="source 'nope'"):
        documents("nope")
    with pytest.raises(ValueError, match="no text files"):
        list(documents(str(tmp_path)))
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["some text"], 100)


def test_windows_are_deterministic_and_cover_each_epoch_once(data):
    d = TokenData(data)
    w = Windows(d, "train", 32, shuffle=True, seed=3)
    n = len(w)
    assert n == (sum(len(s) for s in d.shards["train"]) - 1) // 32
    epoch = w.batch(range(n))
    assert epoch.shape == (n, 33)
    again = Windows(d, "train", 32, shuffle=True, seed=3)
    assert again.batch([5, n + 5]).tolist() == [epoch[5].tolist(), w.batch([n + 5])[0].tolist()]
    plain = Windows(d, "train", 32, shuffle=False).batch(range(n))
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, plain.tolist()))  # a permutation
    flat = np.concatenate(d.shards["train"])
    assert plain[1].tolist() == flat[32:65].tolist()  # consecutive windows share one token
    assert not np.array_equal(epoch.numpy(), w.batch(range(n, 2 * n)).numpy())  # new order each epoch
    with pytest.raises(ValueError, match="fewer than seq_len"):
        Windows(d, "val", 10**6, shuffle=False)


def test_config_precedence_preset_file_overrides(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("preset: tiny\nlr: 1e-3\nmodel:\n  num_hidden_layers: 2\n")
    config = load_config(file=file, overrides=["model.hidden_size=64", "betas=[0.9, 0.99]", "out_dir=runs/x", "max_steps=7"])
    assert config.lr == 1e-3 and config.min_lr == TrainConfig().min_lr and config.max_steps == 7
    assert config.model["num_hidden_layers"] == 2 and config.model["hidden_size"] == 64
    assert config.model["num_partitions"] == TINY_MODELS["ramnet"]["num_partitions"]  # the rest of the model: merged
    assert config.betas == (0.9, 0.99) and config.out_dir == "runs/x"
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"seq_len": 64}))
    small = load_config("small", json_file)
    assert small.seq_len == 64 and small.model == PRESETS["small"]["model"]
    assert load_config() == TrainConfig() == load_config("tiny")
    assert parse_override("report_to=[tensorboard]") == (["report_to"], ["tensorboard"])
    assert parse_override("resume=none") == (["resume"], "none")
    # read as PyYAML read them, without PyYAML
    assert [parse_override(f"k={v}")[1] for v in ("False", "true", "off", "Null", "~", "[a, False, 2]", "[]")] == [
        False, True, False, None, None, ["a", False, 2], []]


def test_presets_are_valid_and_sized_as_documented():
    from ramnet.lm.families import make_config
    from ramnet.models import RAMNetConfig

    for name, values in PRESETS.items():
        config = load_config(name)
        assert config.batch_size % (config.micro_batch_size or 1) == 0, name
        assert Path(config.data) == Path(default_data_dir(**config.prepare)), name  # where `data prepare` writes
        if not config.model_type.startswith("fla.") or importlib.util.find_spec("fla"):
            make_config(config.model_type, dict(config.model, vocab_size=32000))
    small = RAMNetConfig(vocab_size=32000, **PRESETS["small"]["model"])
    per_layer = (2 * small.num_heads * small.num_partitions * small.partition_dim + 2 * small.num_heads * small.head_v_dim
                 ) * small.hidden_size + 3 * small.hidden_size * small.intermediate_size
    no_embedding = small.num_hidden_layers * per_layer + small.vocab_size * small.hidden_size
    assert 20e6 <= no_embedding <= 50e6
    paper = load_config("paper-340m")
    assert paper.batch_size * paper.seq_len == 2**19 and paper.warmup_steps * 2**19 == pytest.approx(500e6, rel=1e-3)


def test_data_prepare_writes_by_default_where_the_presets_read(tmp_path, monkeypatch, capsys):
    from ramnet.cli import main

    monkeypatch.chdir(tmp_path)
    # the tiny preset reads data/python-docs-bpe4k, which is where `ramnet data prepare` writes
    assert load_config("tiny").data == "data/python-docs-bpe4k" == default_data_dir()
    write_corpus(tmp_path / "texts", n_docs=8)
    assert main(["data", "prepare", "--quiet", "--source", "texts", "--vocab-size", "300"]) == 0
    assert capsys.readouterr().out.startswith("data/texts-bpe300: ")
    assert (tmp_path / "data/texts-bpe300/meta.json").exists()
    assert load_config("tiny", overrides=["prepare.source=texts", "prepare.vocab_size=300"]).data == "data/texts-bpe300"
    # another prepare setting names another directory, for `data prepare` and for the config alike
    assert load_config("tiny", overrides=["prepare.vocab_size=8192"]).data == "data/python-docs-bpe8k"
    assert load_config("tiny", overrides=["prepare.max_tokens=20000"]).data == "data/python-docs-bpe4k-20k"
    assert default_data_dir("fineweb-edu", "hf-internal-testing/llama-tokenizer", max_tokens=700_000_000) == \
        load_config("small").data == "data/fineweb-edu-llama-tokenizer-700M"
    with pytest.raises(ValueError, match="`data` is not set and there are no `prepare` settings"):
        load_config("tiny", overrides=["prepare=null"])


@pytest.mark.parametrize(
    "overrides, match",
    [(["bogus=1"], "unknown config key"), (["lr=fast"], "`lr`"), (["batch_size=0"], "`batch_size`"),
     (["min_lr=1"], "`min_lr`"), (["parallel=zero"], "`parallel`"), (["lr"], "key=value"),
     (["batch_size=6", "micro_batch_size=4"], "multiple of `micro_batch_size`"), (["report_to=[x]"], "report_to")],
)
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config("tiny", overrides=overrides)
    assert math.isclose(TrainConfig().lr, 3e-3)


def _copy(data: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(data, tmp_path / "copy")
    return tmp_path / "copy"


def _edit_meta(path: Path, edit) -> None:
    meta = json.loads((path / "meta.json").read_text())
    edit(meta)
    (path / "meta.json").write_text(json.dumps(meta))


def test_data_faults_are_reported_with_the_file_that_is_wrong(data, tmp_path):
    bad = _copy(data, tmp_path)
    assert json.loads((bad / "meta.json").read_text())["max_token_id"] < 512
    shard = bad / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-3])  # truncated (and an odd size)
    with pytest.raises(ValueError, match=f"{shard}.*bytes, but meta.json says .* uint16 tokens.*truncated"):
        TokenData(bad)
    (bad / "val-00000.bin").unlink()
    shard.write_bytes((data / "train-00000.bin").read_bytes())
    with pytest.raises(ValueError, match=f"{bad / 'val-00000.bin'} is missing .*val split"):
        TokenData(bad)
    (bad / "meta.json").write_text('{"vocab_size": 512,')
    with pytest.raises(ValueError, match=f"{bad / 'meta.json'} is malformed: not valid JSON"):
        TokenData(bad)


@pytest.mark.parametrize(
    "edit, match",
    [(lambda m: m.update(dtype="int8"), "`dtype` must be one of uint16, uint32, got 'int8'"),
     (lambda m: m.pop("vocab_size"), "`vocab_size` must be a positive integer, got None"),
     (lambda m: m["splits"].pop("val"), "`splits` must hold train and val"),
     (lambda m: m["splits"]["train"].update(shards=[["../x.bin", 3]]), r"`splits.train.shards` must be a list"),
     (lambda m: m["splits"]["train"].update(tokens=1), r"`splits.train.tokens` \(1\) is not the sum"),
     (lambda m: m.update(max_token_id=512), "says the shards hold token id 512, not below its vocab_size 512")],
)
def test_malformed_meta_is_refused_naming_the_field(data, tmp_path, edit, match):
    bad = _copy(data, tmp_path)
    _edit_meta(bad, edit)
    with pytest.raises(ValueError, match=f"{bad / 'meta.json'}.*" + match):
        TokenData(bad)


def test_token_ids_beyond_the_vocabulary_are_refused_naming_the_shard(data, tmp_path):
    bad = _copy(data, tmp_path)
    _edit_meta(bad, lambda m: m.pop("max_token_id"))  # data prepared before max_token_id was recorded
    tokens = np.fromfile(bad / "train-00000.bin", dtype=np.uint16)
    tokens[100] = 600
    tokens.tofile(bad / "train-00000.bin")
    w = Windows(TokenData(bad), "train", 32, shuffle=False)
    assert w.batch([0]).shape == (1, 33)  # the windows without it read as before
    with pytest.raises(ValueError, match=f"{bad / 'train-00000.bin'} holds token id 600 at token 100, not below the vocabulary size 512"):
        w.batch(range(len(w)))


def test_bpe_training_shows_its_progress(tmp_path, capsys):
    source = write_corpus(tmp_path / "texts", n_docs=4)
    prepare(tmp_path / "quiet", source=str(source), vocab_size=300, progress=False)
    assert "BPE" not in capsys.readouterr().err
    prepare(tmp_path / "shown", source=str(source), vocab_size=300, progress=True)
    assert "BPE 300: reading" in capsys.readouterr().err


def test_metrics_go_to_no_third_party_sink_unless_asked():
    # transformers' TrainingArguments default is none too; report_to=[tensorboard,wandb] turns them on
    assert TrainConfig().report_to == [] and all(load_config(name).report_to == [] for name in PRESETS)
    assert load_config("tiny", overrides=["report_to=[tensorboard,wandb]"]).report_to == ["tensorboard", "wandb"]
