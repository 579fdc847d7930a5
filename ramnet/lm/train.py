"""The language-model trainer: one process, or several through `torchrun` with DDP or FSDP2.

A step reads `batch_size` windows of the shuffled training stream; process `rank` takes, in its
accumulation step `m`, the micro-batch that starts at `(m * world + rank) * micro_batch_size`. The
windows of a step therefore do not depend on how many processes share it, and the loss is the mean
over all of them, so runs with the same `batch_size` agree whatever the process count. The stream
position (samples seen) is a pure function of the step, which makes resuming exact.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm.auto import tqdm

from . import checkpoint, families
from .config import TrainConfig
from .data import TokenData, Windows, prepare

# Excluded from weight decay besides the 1-D parameters (norm weights, biases, fla's and Mamba's
# A_log, D, dt_bias) and those marked `_no_weight_decay` (as fla marks those): the per-head e^alpha
# temperatures of RAM-Net's address decoder (spec section 5).
NO_DECAY_SUFFIXES = ("q_log_scale", "k_log_scale")


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool  # whether this trainer initialised the process group (and so tears it down)

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK; NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"`device` must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("`device` is 'cuda', but torch sees no CUDA GPU")
    dev = torch.device("cuda", local) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = world > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local, dev, owns)


def lr_schedule(config: TrainConfig):
    """Linear warm-up to `lr` over `warmup_steps`, then a cosine down to `min_lr` at `max_steps`
    (as a factor of `lr`, for LambdaLR)."""

    def factor(step: int) -> float:
        if config.lr == 0:
            return 0.0
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
        return (config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))) / config.lr

    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            skip = p.ndim < 2 or name.endswith(NO_DECAY_SUFFIXES) or getattr(p, "_no_weight_decay", False)
            (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_model(config: TrainConfig, data: TokenData):
    """The `model_type` family's causal LM, with the data's vocabulary and special tokens."""
    tok = data.tokenizer()
    kwargs = dict(config.model)
    kwargs.setdefault("vocab_size", data.vocab_size)
    if kwargs["vocab_size"] < data.vocab_size:
        raise ValueError(f"`model.vocab_size` ({kwargs['vocab_size']}) is smaller than the tokenizer's ({data.vocab_size})")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        kwargs.setdefault(key, getattr(tok, key))
    torch.manual_seed(config.seed)  # the same initial weights on every process
    return families.build(config.model_type, kwargs)


class Reporter:
    """metrics.jsonl always; TensorBoard and wandb when asked for and installed. Rank 0 only."""

    def __init__(self, config: TrainConfig, out_dir: Path, enabled: bool):
        self.jsonl = self.tb = self.wandb = None
        if not enabled:
            return
        self.jsonl = open(out_dir / "metrics.jsonl", "a")
        if "tensorboard" in config.report_to and importlib.util.find_spec("tensorboard"):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        if "wandb" in config.report_to and importlib.util.find_spec("wandb"):
            import wandb

            try:
                self.wandb = wandb.init(project=config.wandb_project, config=config.to_dict(), dir=str(out_dir))
            except Exception as err:  # e.g. installed but not logged in: train anyway, with the other logs
                tqdm.write(f"wandb: not logging ({type(err).__name__}: {err}); set report_to=[tensorboard] to skip it")

    def log(self, step: int, metrics: dict) -> None:
        if self.jsonl is None:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            if self.tb is not None:
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        for sink in (self.jsonl, self.tb):
            if sink is not None:
                sink.close()
        if self.wandb is not None:
            self.wandb.finish()


def _all_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(x)  # SUM: gloo has no AVG
        x = x / d.world
    return x


@torch.no_grad()
def evaluate(model, windows: Windows, config: TrainConfig, d: Dist, autocast) -> float:
    """Mean held-out loss (nats per token) over the first `eval_batches * batch_size` windows of the
    split. Every process runs the same number of forwards (FSDP gathers weights collectively)."""
    n = min(len(windows), config.eval_batches * config.batch_size) // d.world * d.world
    mine = list(range(d.rank, n, d.world))
    totals = torch.zeros(2, dtype=torch.float64, device=d.device)
    model.eval()
    for i in range(0, len(mine), config.micro_batch_size):
        batch = windows.batch(mine[i : i + config.micro_batch_size]).to(d.device)
        with autocast:
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        totals[0] += F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").double()
        totals[1] += batch[:, 1:].numel()
    model.train()
    if d.world > 1:
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


def _tie(raw, weights: dict) -> dict:
    """`save_pretrained` stores a tied weight once: give the LM head the input embedding's."""
    if raw.config.tie_word_embeddings:
        names = {module: name for name, module in raw.named_modules()}
        embed, head = (names[m] + ".weight" for m in (raw.get_input_embeddings(), raw.get_output_embeddings()))
        weights.setdefault(head, weights[embed])
    return weights


def _resume_path(config: TrainConfig, out_dir: Path) -> Path | None:
    if config.resume == "auto":
        return checkpoint.latest(out_dir)
    if config.resume == "none":
        if checkpoint.list_checkpoints(out_dir):
            raise ValueError(f"`resume` is 'none' but {out_dir} has checkpoints: use resume=auto or another out_dir")
        return None
    path = Path(config.resume)
    if not (path / checkpoint.STATE_FILE).exists():
        raise ValueError(f"`resume`: {path} is not a checkpoint (no {checkpoint.STATE_FILE})")
    return path


def train(config: TrainConfig, progress: bool = True) -> dict:
    """Runs (or continues) training; returns {"history": per-step metrics of this run, "evals": [...],
    "checkpoint": the last checkpoint, "unigram_entropy": of the training data}."""
    d = setup_distributed(config.device)
    try:
        return _train(config, d, progress)
    finally:
        if d.owns_group:
            dist.destroy_process_group()


def _barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def _train(config: TrainConfig, d: Dist, progress: bool) -> dict:
    out_dir, data_dir = Path(config.out_dir), Path(config.data)
    per_step = config.micro_batch_size * d.world
    if config.batch_size % per_step:
        raise ValueError(
            f"`batch_size` ({config.batch_size}) must be a multiple of micro_batch_size x processes "
            f"({config.micro_batch_size} x {d.world})"
        )
    accum = config.batch_size // per_step
    if not (data_dir / "meta.json").exists():
        if config.prepare is None:
            raise ValueError(f"`data`: {data_dir} is not prepared and the config has no `prepare` settings")
        if d.main:
            try:
                prepare(data_dir, **config.prepare, progress=progress)
            except TypeError as err:  # an unknown key
                raise ValueError(f"`prepare`: {err}") from err
        _barrier(d)
    data = TokenData(data_dir)
    train_windows = Windows(data, "train", config.seq_len, shuffle=True, seed=config.seed)
    val_windows = Windows(data, "val", config.seq_len, shuffle=False) if data.meta["splits"]["val"]["tokens"] > config.seq_len else None

    model = build_model(config, data)
    raw = model  # the PreTrainedModel (FSDP2 shards it in place; DDP wraps it)
    n_params = sum(p.numel() for p in raw.parameters())
    n_embed = raw.get_input_embeddings().weight.numel()
    model.to(d.device)
    if config.gradient_checkpointing:
        raw.gradient_checkpointing_enable()
    if d.world > 1 and config.parallel == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    elif d.world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in raw.base_model.layers:  # one all-gather per block, overlapped with the previous one
            fully_shard(layer)
        fully_shard(raw)
    # Built after sharding: fully_shard replaces the parameters with sharded ones.
    optimizer = torch.optim.AdamW(
        param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas, eps=config.adam_eps,
        fused=True,  # one kernel for all parameters (CPU and CUDA, DTensors included)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config))
    bf16 = config.precision == "bf16" or (config.precision == "auto" and d.device.type == "cuda")
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=bf16)

    step = samples = 0
    resume_from = _resume_path(config, out_dir)
    if resume_from is not None:
        state = checkpoint.load_trainer_state(resume_from)
        full = StateDictOptions(full_state_dict=True)
        weights = _tie(raw, load_file(resume_from / "model.safetensors"))
        set_model_state_dict(model, weights, options=full)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=full)
        scheduler.load_state_dict(state["scheduler"])
        step, samples = state["step"], state["samples"]
        # The schedule of this run's config from the saved step on: the same as before unless lr,
        # min_lr, warmup_steps or max_steps were changed (e.g. to extend a run).
        scheduler.base_lrs = [config.lr] * len(optimizer.param_groups)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_schedule(config)(step)
        if len(state["rng"]) == d.world:
            checkpoint.set_rng_state(state["rng"][d.rank])
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    reporter = Reporter(config, out_dir, d.main)
    unigram = data.meta["unigram_entropy"]
    if d.main and progress:
        tqdm.write(
            f"model: {n_params / 1e6:.2f}M parameters ({(n_params - n_embed) / 1e6:.2f}M without the input embedding); "
            f"data: {data.meta['splits']['train']['tokens']:,} training tokens, unigram entropy {unigram:.3f} nats; "
            f"{d.world} process(es) x {accum} accumulation step(s) x {config.micro_batch_size} sequences of {config.seq_len}"
            + (f"; resumed from {resume_from} at step {step}" if resume_from else "")
        )

    def save() -> Path | None:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(model, options=opts)
        optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
        rngs = [None] * d.world
        if d.world > 1:
            dist.all_gather_object(rngs, checkpoint.rng_state())
        else:
            rngs = [checkpoint.rng_state()]
        path = None
        if d.main:
            trainer_state = {"step": step, "samples": samples, "optimizer": optim_sd, "scheduler": scheduler.state_dict(),
                             "rng": rngs, "world_size": d.world}
            path = checkpoint.save(out_dir, step, raw, model_sd, data.tokenizer(), config.to_dict(), trainer_state,
                                   config.keep_checkpoints)
        _barrier(d)
        return path

    history, evals, last_ckpt = [], [], resume_from
    tokens_per_step = config.batch_size * config.seq_len
    bar = tqdm(total=config.max_steps, initial=step, unit="step", disable=not (d.main and progress), dynamic_ncols=True)
    model.train()
    t0, t_steps = time.perf_counter(), 0
    while step < config.max_steps:
        loss_sum = torch.zeros((), device=d.device)
        for m in range(accum):
            first = samples + (m * d.world + d.rank) * config.micro_batch_size
            batch = train_windows.batch(range(first, first + config.micro_batch_size)).to(d.device, non_blocking=True)
            last = m == accum - 1
            # Gradients are reduced across processes only on the last accumulation step.
            sync = contextlib.nullcontext()
            if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last:
                sync = model.no_sync()
            elif d.world > 1 and config.parallel == "fsdp":
                raw.set_requires_gradient_sync(last)
            with sync:
                with autocast:
                    logits = model(input_ids=batch[:, :-1], use_cache=False).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
                (loss / accum).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        samples += config.batch_size
        t_steps += 1
        loss = _all_mean(loss_sum / accum, d).item()
        metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm.item()}
        if step % config.log_interval == 0 or step == config.max_steps:
            elapsed = time.perf_counter() - t0
            metrics["train/tokens_per_s"] = t_steps * tokens_per_step / elapsed
            if d.device.type == "cuda":  # since the run started: activations, weights and optimizer state
                metrics["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(d.device) / 2**30
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{metrics['train/tokens_per_s']:,.0f}", lr=f"{lr:.2e}")
            t0, t_steps = time.perf_counter(), 0
        if val_windows is not None and ((config.eval_interval and step % config.eval_interval == 0) or step == config.max_steps):
            val = evaluate(model, val_windows, config, d, autocast)
            metrics.update({"val/loss": val, "val/ppl": math.exp(min(val, 700.0))})
            evals.append({"step": step, "loss": val})
            if d.main and progress:
                tqdm.write(f"step {step}: train loss {loss:.4f}, held-out loss {val:.4f} (ppl {math.exp(val):.2f})")
        metrics["tokens"] = samples * config.seq_len
        history.append({"step": step, **metrics})
        reporter.log(step, metrics)
        bar.update(1)
        if (config.save_interval and step % config.save_interval == 0) or step == config.max_steps:
            last_ckpt = save()
    bar.close()
    reporter.close()
    return {"history": history, "evals": evals, "checkpoint": last_ckpt, "unigram_entropy": unigram}
