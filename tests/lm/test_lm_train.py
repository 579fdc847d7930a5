"""The trainer: exact resume, DDP and FSDP2 over 2 CPU processes against 1, checkpoints, schedule,
weight-decay groups."""

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from lm_helpers import (  # noqa: F401  (one_thread: an autouse fixture)
    TINY_MODEL, check_resume_is_exact, check_two_processes_match_one, one_thread, prepared_data, tiny_args, tiny_config,
)

from ramnet.cli import main
from ramnet.lm import checkpoint
from ramnet.lm.config import TrainConfig
from ramnet.lm.distributed import training_processes
from ramnet.lm.train import Trainer, batch_layout, lr_schedule, param_groups, train
from ramnet.models import RAMNetConfig, RAMNetForCausalLM


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_data(tmp_path_factory)


def test_resume_reproduces_the_uninterrupted_run_exactly(data, tmp_path):
    check_resume_is_exact(data, tmp_path)


def test_resume_follows_a_changed_schedule(data, tmp_path):
    """Extending a finished run: the schedule of the new max_steps applies from the saved step."""
    train(tiny_config(data, tmp_path, "max_steps=3"), progress=False)
    longer = train(tiny_config(data, tmp_path, "max_steps=8", "eval_interval=0", "save_interval=0"), progress=False)
    f = lr_schedule(tiny_config(data, tmp_path, "max_steps=8"))
    assert [h["train/lr"] for h in longer["history"]] == pytest.approx([1e-2 * f(s) for s in range(3, 8)])


def test_checkpoints_are_loadable_and_pruned(data, tmp_path):
    result = train(tiny_config(data, tmp_path, "keep_checkpoints=1"), progress=False)
    out = tmp_path
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-000006"]
    assert (out / "latest").read_text().strip() == "checkpoint-000006" == result["checkpoint"].name
    assert not list(out.glob("*.tmp"))
    ckpt = result["checkpoint"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_config.json", "trainer_state.pt"):
        assert (ckpt / name).exists(), name
    state = checkpoint.load_trainer_state(ckpt)
    assert state["step"] == 6 and state["samples"] == 24 and len(state["rng"]) == 1
    model = RAMNetForCausalLM.from_pretrained(ckpt)
    assert model.config.vocab_size == 512 and model.config.eos_token_id == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 7)) and "val/loss" in lines[2]
    with pytest.raises(ValueError, match="resume"):
        train(tiny_config(data, tmp_path, "resume=none"), progress=False)


def test_loss_falls_below_the_unigram_entropy(data, tmp_path):
    result = train(tiny_config(data, tmp_path, "max_steps=60", "eval_interval=0", "save_interval=0",
                               "batch_size=8", "micro_batch_size=8", "lr=1e-2"), progress=False)
    assert result["history"][0]["train/loss"] > result["unigram_entropy"]
    assert result["evals"][-1]["loss"] < result["unigram_entropy"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_at_the_same_global_batch(data, tmp_path, parallel):
    check_two_processes_match_one(data, tmp_path, parallel, 5 if parallel == "fsdp" else 3)


def test_lr_schedule_warms_up_then_follows_a_cosine_to_min_lr(data, tmp_path):
    config = tiny_config(data, tmp_path, "max_steps=100", "warmup_steps=10", "lr=1e-3", "min_lr=1e-4")
    f = lr_schedule(config)
    # transformers' warm-up: s / warmup_steps (the hand-written schedule before it had (s + 1) / warmup_steps)
    assert f(0) == 0.0 and f(1) == pytest.approx(0.1) and f(9) == pytest.approx(0.9)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx((1e-4 + 0.9e-3 * 0.5) / 1e-3)
    assert f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_lr_schedule_is_transformers_cosine_with_min_lr(data, tmp_path):
    from transformers import get_scheduler

    config = tiny_config(data, tmp_path, "max_steps=50", "warmup_steps=7", "lr=2e-3", "min_lr=3e-4")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-3)
    theirs = get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=7, num_training_steps=50,
                           scheduler_specific_kwargs={"min_lr": 3e-4})
    f = lr_schedule(config)
    for step in range(50):
        assert 2e-3 * f(step) == pytest.approx(theirs.get_last_lr()[0], rel=1e-12, abs=1e-15)
        optimizer.step()
        theirs.step()
    # after the warm-up it is the hand-written schedule it replaced, step for step
    old = lambda s: (3e-4 + (2e-3 - 3e-4) * 0.5 * (1 + math.cos(math.pi * (s - 7) / 43))) / 2e-3  # noqa: E731
    assert [f(s) for s in range(7, 51)] == pytest.approx([old(s) for s in range(7, 51)])


def test_weight_decay_skips_norms_biases_and_the_alpha_scalars():
    model = RAMNetForCausalLM(RAMNetConfig(vocab_size=64, **TINY_MODEL))
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(64))  # a bias, to see where it goes
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "lm_head.bias" in skipped and "model.norm.weight" in skipped
    assert "model.layers.0.attn.q_log_scale" in skipped and "model.layers.1.attn.k_log_scale" in skipped
    assert "model.layers.0.attn_norm.weight" in skipped and "model.layers.0.mlp_norm.weight" in skipped
    decayed = {names[id(p)] for p in decay["params"]}
    assert "model.embed_tokens.weight" in decayed and "model.layers.0.attn.q_proj.weight" in decayed
    assert len(skipped) + len(decayed) == len(names)


def test_config_errors_name_the_argument(data, tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        train(tiny_config(data, tmp_path, "batch_size=6", "micro_batch_size=4"), progress=False)
    with pytest.raises(ValueError, match="`data`"):
        train(tiny_config(tmp_path / "missing", tmp_path), progress=False)
    with pytest.raises(ValueError, match="hidden_sise"):
        train(tiny_config(data, tmp_path, "model.hidden_sise=64"), progress=False)
    with pytest.raises(ValueError, match="vocab_size"):
        train(tiny_config(data, tmp_path, "model.vocab_size=100"), progress=False)
    assert math.isfinite(train(tiny_config(data, tmp_path, "max_steps=1"), progress=False)["history"][0]["train/loss"])


def test_cli_reports_a_bad_config_in_one_line_with_status_2(capsys):
    from ramnet.cli import main

    assert main(["train", "--dump-config", "lr=fast"]) == 2
    assert capsys.readouterr().err == "ramnet train: error: `lr` must be a number, got 'fast'\n"


def test_each_process_trains_on_its_own_gpu(monkeypatch):
    """torchrun's LOCAL_RANK picks the GPU of a bare `cuda` (or `auto` with a GPU); an index is kept."""
    from ramnet.devices import local_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert local_device("cuda", 3) == local_device("auto", 3) == torch.device("cuda", 3)
    assert local_device("cuda:0", 3) == torch.device("cuda", 0) and local_device("cpu", 3) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_device("auto", 3) == torch.device("cpu")
    with pytest.raises(ValueError, match="`device`: cuda was asked for"):
        local_device("cuda", 0, option="`device`")


def test_temperature_lr_scale_gives_the_alpha_scalars_their_own_lr(data, tmp_path):
    """`temperature_lr_scale` puts q/k_log_scale in a third group at that multiple of the schedule's lr,
    also after a resume; at 1 (the default) the two groups of older checkpoints stay."""
    model = RAMNetForCausalLM(RAMNetConfig(vocab_size=64, **TINY_MODEL))
    assert len(param_groups(model, 0.1)) == 2
    decay, no_decay, temperatures = param_groups(model, 0.1, temperature_lr_scale=30.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].rsplit(".", 1)[-1] for p in temperatures["params"]} == {"q_log_scale", "k_log_scale"}
    assert temperatures["lr_scale"] == 30.0 and temperatures["weight_decay"] == 0.0
    assert not {id(p) for p in temperatures["params"]} & {id(p) for p in decay["params"] + no_decay["params"]}
    with pytest.raises(ValueError, match="temperature_lr_scale"):
        tiny_config(data, tmp_path, "temperature_lr_scale=0")

    config = tiny_config(data, tmp_path, "temperature_lr_scale=30", "max_steps=4", "save_interval=2", "eval_interval=0")
    train(config, progress=False)
    f = lr_schedule(config)
    with training_processes("cpu") as processes:
        trainer = Trainer(tiny_config(data, tmp_path, "temperature_lr_scale=30", "max_steps=4"), processes, False)
        trainer.restore()
        lrs = [g["lr"] for g in trainer.optimizer.param_groups]
    assert trainer.step == 4
    assert lrs == pytest.approx([1e-2 * f(4), 1e-2 * f(4), 30 * 1e-2 * f(4)])


def test_the_micro_batch_is_the_batch_over_the_processes_unless_given():
    assert batch_layout(TrainConfig(batch_size=8), 1) == (8, 1)
    assert batch_layout(TrainConfig(batch_size=8), 2) == (4, 1)  # torchrun --nproc_per_node 2 on the tiny preset
    assert batch_layout(TrainConfig(batch_size=8, micro_batch_size=2), 2) == (2, 2)
    with pytest.raises(ValueError, match=r"`batch_size` \(9\) cannot be split over 2 processes: set batch_size to a "
                                         r"multiple of 2"):
        batch_layout(TrainConfig(batch_size=9), 2)
    with pytest.raises(ValueError, match=r"multiple of micro_batch_size x processes \(8 x 2\): change "
                                         r"micro_batch_size, or set micro_batch_size=null for batch_size / processes"):
        batch_layout(TrainConfig(batch_size=8, micro_batch_size=8), 2)


def test_torchrun_derives_the_micro_batch_and_speaks_once(data, tmp_path):
    """`torchrun --nproc_per_node 2 -m ramnet.cli train` without micro_batch_size: 2 gloo processes of
    batch_size / 2 each; one final line, one describe line; an impossible split is one error line."""
    def torchrun(out_dir, *overrides):
        args = tiny_args(data, tmp_path / out_dir, "micro_batch_size=null", "max_steps=2", "eval_interval=0",
                         "save_interval=0", *overrides)
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "ramnet.cli", "train", *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=240)

    done = torchrun("run")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("done in ") == 1 and done.stdout.startswith("done in ")
    assert done.stderr.count("2 process(es) x 1 accumulation step(s) x 2 sequences of 32") == 1
    failed = torchrun("bad", "batch_size=3")
    assert failed.returncode != 0
    assert failed.stderr.count("ramnet train: error: `batch_size` (3) cannot be split over 2 processes") == 1


def test_a_finished_run_started_again_has_nothing_to_do(data, tmp_path, capsys):
    args = tiny_args(data, tmp_path, "max_steps=3", "eval_interval=0")
    assert main(["train", "--quiet", *args]) == 0
    capsys.readouterr()
    assert main(["train", *args]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"nothing to do: {tmp_path} is at step 3, and max_steps is 3. To train further, "
                                   "raise max_steps, e.g. `ramnet train ... max_steps=6`")
    assert "3/3" not in captured.err and "model:" not in captured.err  # no bar, no describe line


def test_gradient_checkpointing_raises_no_deprecation_warning(data, tmp_path):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*deprecated.*")
        train(tiny_config(data, tmp_path, "gradient_checkpointing=true", "max_steps=1", "eval_interval=0"),
              progress=False)
