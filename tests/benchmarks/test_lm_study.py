"""benchmarks/lm_study.py: every variant builds a valid run config, the variants that stand for earlier
runs train the same model, and the comparison's rows (scale.json) come out of studies' JSON."""

import importlib.util
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from ramnet.lm.config import load_config
from ramnet.models import RAMNetConfig

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lm_study.py"
sys.path.insert(0, str(SCRIPT.parent))  # lm_study imports summarize_lm from beside it
spec = importlib.util.spec_from_file_location("lm_study", SCRIPT)
lm_study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lm_study)


def run_config(name):
    preset, overrides = lm_study.VARIANTS[name]
    return load_config(preset, overrides=overrides)


@pytest.mark.parametrize("name", sorted(lm_study.VARIANTS))
def test_every_variant_is_a_valid_run(name):
    config = run_config(name)
    if config.model_type == "ramnet":
        RAMNetConfig(vocab_size=8192, **config.model)  # the model's own checks


def test_the_comparison_has_one_variant_per_family_that_trains_its_preset():
    for variant, family in lm_study.COMPARED.items():
        assert variant in lm_study.VARIANTS
    by_family = {family: variant for variant, family in lm_study.COMPARED.items() if variant == family}
    assert set(by_family) == set(lm_study.COMPARED.values())
    for family, variant in by_family.items():  # `--variants FAMILY` runs the family's preset unchanged
        assert lm_study.VARIANTS[variant][1] == []


def trains(name):
    config = run_config(name)
    return config.model, config.temperature_lr_scale


def test_small_is_the_combination_the_ablation_favoured_and_the_paper_variants_are_the_old_runs():
    small = run_config("ramnet")
    assert trains("ramnet") == trains("ramnet-conv-gate")  # batch 6's convolution, which small took
    assert small.model["output_gate"] and small.temperature_lr_scale == 30 and small.model["short_conv_size"] == 4
    # scale_c's and scale_e's RAM-Net, and the base of batch 6's variants: small without the convolution.
    before = dict(small.model)
    del before["short_conv_size"]
    assert trains("ramnet-cape-absolute-gate-alpha-lr30") == (before, 30.0)
    assert trains("ramnet-gamma-spread") == ({**before, "gamma": [1, 4, 16, 64, 1, 4, 16, 64]}, 30.0)
    assert trains("ramnet-gamma4") == ({**before, "gamma": 4.0}, 30.0)
    paper = RAMNetConfig(vocab_size=8192, **run_config("ramnet-paper").model)
    assert not paper.output_gate and paper.num_cape_heads == [8, 8, 8, 8, 4, 4, 4, 4]
    # Batch 5's `ramnet` was `small` with the default CAPE schedule, in proportion to depth.
    depth = RAMNetConfig(vocab_size=8192, **run_config("ramnet-cape-depth").model)
    default = RAMNetConfig(vocab_size=8192, **{k: v for k, v in run_config("ramnet-paper").model.items()
                                                if k != "num_cape_heads"})
    assert depth.num_cape_heads == default.num_cape_heads == [8, 4, 0, 0, 0, 0, 0, 0]


def test_scale_rows_give_every_evaluation_of_every_family():
    study = {"meta": {"git_rev": "abc", "jobs": 2, "data": corpus(100e6, 197)}, "rows": [
        {"variant": "ramnet", "preset": "small", "status": "done", "tok_s": 5.0,
         "tokens": 20, "evals": [[10, 30.0], [20, 20.0]]},
        {"variant": "sliding", "preset": "small-sliding", "status": "stopped at the deadline", "tok_s": 4.0,
         "tokens": 12, "evals": [[10, 40.0]]},
        {"variant": "gla", "status": "failed (exit 1)"},
    ]}
    study["rows"].append({"variant": "ramnet-gamma4", "preset": "small-paper", "status": "done", "tok_s": 5.0,
                          "tokens": 20, "evals": [[20, 19.0]]})  # an ablation: not in the comparison
    rows = lm_study.scale_rows([study])
    assert [(r["family"], r["tokens"], r["ppl"], r["final"], r["complete"]) for r in rows] == [
        ("ramnet", 10, 30.0, False, True), ("ramnet", 20, 20.0, True, True), ("sliding", 10, 40.0, True, False)]
    assert all(r["git_rev"] == "abc" and r["jobs"] == 2 for r in rows)
    assert {r["corpus"] for r in rows} == {"python-packages: 100.00M training tokens, 197 distributions"}


def corpus(train_tokens, distributions):
    return {"source": "python-packages", "splits": {"train": {"tokens": int(train_tokens)}},
            "distributions": distributions}


def study_of(variant, preset, corpus_meta, ppl, status="done"):
    return {"meta": {"git_rev": "abc", "jobs": 1, "data": corpus_meta}, "rows": [
        {"variant": variant, "preset": preset, "status": status, "tok_s": 5.0, "tokens": 20, "steps": 2,
         "ppl": ppl, "best_ppl": ppl, "peak_memory_gib": 1.0, "evals": [[20, ppl]]}]}


def test_scale_summaries_name_runs_by_corpus_only_where_the_studies_span_corpora():
    a, b = corpus(104.79e6, 203), corpus(99.66e6, 197)
    one = lm_study.scale_summaries([study_of("sliding", "small-sliding", b, 30.0),
                                    study_of("sliding", "small-sliding", b, 14.0)])
    assert list(one) == ["sliding"] and one["sliding"]["final_ppl"] == 14.0  # the later run replaces the earlier
    both = lm_study.scale_summaries([study_of("ramnet", "small", a, 14.8), study_of("ramnet", "small", b, 13.5)])
    assert {k: v["final_ppl"] for k, v in both.items()} == {"ramnet [104.8M corpus]": 14.8,
                                                            "ramnet [99.7M corpus]": 13.5}
    # a run stopped at a deadline gives way to the same variant's complete run, on any corpus
    stopped = lm_study.scale_summaries([study_of("hybrid", "small-hybrid", a, 36.4, "stopped at the deadline"),
                                        study_of("hybrid", "small-hybrid", b, 11.4),
                                        study_of("raven", "small-raven", a, 42.0, "stopped at the deadline")])
    assert {k: v["final_ppl"] for k, v in stopped.items()} == {"hybrid [99.7M corpus]": 11.4,
                                                               "raven [104.8M corpus]": 42.0}


def test_the_family_preset_replaces_its_stand_in_on_the_corpus_where_it_completed():
    a, b = corpus(104.79e6, 203), corpus(99.66e6, 197)
    old = "ramnet-cape-absolute-gate-alpha-lr30"  # small before the convolution, the comparison's RAM-Net until then
    studies = [study_of(old, "small-paper", a, 14.8), study_of(old, "small-paper", b, 13.5),
               study_of("ramnet", "small", b, 12.3)]
    summaries = lm_study.scale_summaries(studies)
    assert {k: v["final_ppl"] for k, v in summaries.items()} == {f"{old} [104.8M corpus]": 14.8,
                                                                 "ramnet [99.7M corpus]": 12.3}
    rows = lm_study.scale_rows(studies)
    assert sorted((r["variant"], r["ppl"]) for r in rows) == [("ramnet", 12.3), (old, 14.8)]
    # a preset run that did not complete leaves the stand-in in place
    stopped = study_of("ramnet", "small", b, 20.0, "stopped at the deadline")
    assert sorted(r["ppl"] for r in lm_study.scale_rows([studies[1], stopped])) == [13.5, 20.0]


@pytest.mark.parametrize("resumable", [False, True])
def test_a_resumable_study_checkpoints_at_every_evaluation_and_continues(resumable, tmp_path):
    argv = lm_study.command("ramnet", tmp_path / "data", tmp_path / "runs", ["max_steps=3052"], resumable)
    preset = argv[argv.index("--preset") + 1]
    config = load_config(preset, overrides=argv[argv.index("--quiet") + 1:])  # the key=value overrides
    assert config.max_steps == 3052  # the extra overrides still come last
    if resumable:
        assert config.resume == "auto" and config.save_interval == config.eval_interval
    else:
        assert config.resume == "none" and config.save_interval == 0


def test_sigterm_stops_the_runs_and_the_study_still_reports(monkeypatch, tmp_path):
    # Stand-in runs that would train for a minute; SIGTERM to the study (its machine's time running out)
    # must stop them within seconds and give each its status, as a deadline does.
    monkeypatch.setattr(lm_study, "command", lambda *args, **kwargs: [sys.executable, "-c", "import time; time.sleep(60)"])
    deadline = lm_study.Deadline(float("inf"))
    previous = deadline.on_sigterm()
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        timer.start()
        start = time.time()
        status = lm_study.run_all(["ramnet", "gla", "sliding"], tmp_path / "data", tmp_path / "runs", 2, [], deadline,
                                  log=lambda msg: None)
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    assert time.time() - start < 20
    assert status == {"ramnet": "stopped at the deadline", "gla": "stopped at the deadline",
                      "sliding": "not started (deadline)"}


def test_scale_meta_lists_what_the_studies_do_not_share_and_leaves_their_notes():
    a = {"meta": {"device": "cuda (NVIDIA H200)", "torch": "2.11", "git_rev": "abc", "jobs": 1, "assembled_note": "x"}}
    b = {"meta": {"device": "cuda (NVIDIA H100 80GB HBM3)", "torch": "2.11", "git_rev": "def", "jobs": 7}}
    assert lm_study.scale_meta([a, b]) == {"device": ["cuda (NVIDIA H100 80GB HBM3)", "cuda (NVIDIA H200)"],
                                           "torch": "2.11", "git_rev": ["abc", "def"]}
