"""The language-model trainer: one process, or several through `torchrun` with DDP or FSDP2.

A step reads `batch_size` windows of the shuffled training stream; process `rank` takes, in its
accumulation step `m`, the micro-batch that starts at `(m * world + rank) * micro_batch_size`. The
windows of a step therefore do not depend on how many processes share it, and the loss is the mean
over all of them, so runs with the same `batch_size` agree whatever the process count. The stream
position (samples seen) is a pure function of the step, which makes resuming exact.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from . import checkpoint, families
from .config import TrainConfig
from .data import TokenData, Windows, prepare
from .distributed import Processes, parallelism, training_processes
from .reporting import Reporter

# Excluded from weight decay besides the 1-D parameters (norm weights, biases, fla's and Mamba's
# A_log, D, dt_bias) and those marked `_no_weight_decay` (as fla marks those): the per-head e^alpha
# temperatures of RAM-Net's address decoder.
TEMPERATURE_SUFFIXES = ("q_log_scale", "k_log_scale")
NO_DECAY_SUFFIXES = TEMPERATURE_SUFFIXES
log = logging.getLogger(__name__)


def lr_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' cosine-with-min-lr schedule (``lr_scheduler_type="cosine_with_min_lr"`` of its
    Trainer): the lr of step ``s`` rises linearly as ``lr * s / warmup_steps``, then falls along a
    cosine to ``min_lr`` at ``max_steps``."""
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.max_steps,
        min_lr_rate=config.min_lr / config.lr if config.lr else 0.0)


def lr_schedule(config: TrainConfig):
    """The factor of `lr` at each step (``lr_scheduler``'s), as a function of the step."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return lr_scheduler(config, probe).lr_lambdas[0]


def param_groups(model: torch.nn.Module, weight_decay: float, temperature_lr_scale: float = 1.0) -> list[dict]:
    """AdamW's groups: decayed, not decayed, and, when `temperature_lr_scale` is not 1, RAM-Net's
    per-head temperatures in a third group whose lr is that multiple of the schedule's (its
    `lr_scale`). With the default there are two groups, so older checkpoints' optimizer states load."""
    decay, no_decay, temperatures = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            if temperature_lr_scale != 1.0 and name.endswith(TEMPERATURE_SUFFIXES):
                temperatures.append(p)
                continue
            skip = p.ndim < 2 or name.endswith(NO_DECAY_SUFFIXES) or getattr(p, "_no_weight_decay", False)
            (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    if temperature_lr_scale != 1.0:
        groups.append({"params": temperatures, "weight_decay": 0.0, "lr_scale": temperature_lr_scale})
    return groups


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


def prepared_data(config: TrainConfig, processes: Processes, progress: bool) -> TokenData:
    """The config's data directory; rank 0 prepares it first when it is missing and `prepare` is set."""
    data_dir = Path(config.data)
    if not (data_dir / "meta.json").exists():
        if config.prepare is None:
            raise ValueError(f"`data`: {data_dir} is not prepared and the config has no `prepare` settings")
        if processes.main:
            try:
                prepare(data_dir, **config.prepare, progress=progress)
            except TypeError as err:  # an unknown key
                raise ValueError(f"`prepare`: {err}") from err
        processes.barrier()
    return TokenData(data_dir)


def batch_layout(config: TrainConfig, world: int) -> tuple[int, int]:
    """(micro-batch size, micro-batches per process and optimizer step), so that a step reads
    `batch_size` sequences over `world` processes. Without an explicit `micro_batch_size`, each process
    takes its share of the batch at once: batch_size / world."""
    micro = config.micro_batch_size
    if micro is None:
        if config.batch_size % world:
            raise ValueError(f"`batch_size` ({config.batch_size}) cannot be split over {world} processes: set "
                             f"batch_size to a multiple of {world}, or micro_batch_size so that batch_size is a "
                             f"multiple of micro_batch_size x {world}")
        return config.batch_size // world, 1
    if config.batch_size % (micro * world):
        raise ValueError(
            f"`batch_size` ({config.batch_size}) must be a multiple of micro_batch_size x processes "
            f"({micro} x {world}): change micro_batch_size, or set micro_batch_size=null for batch_size / processes"
        )
    return micro, config.batch_size // (micro * world)


class Trainer:
    """One run: built (data, model, optimizer, schedule) on construction; `restore` continues a
    checkpoint, `train_step` takes one optimizer step, `held_out_loss` evaluates, `save` writes a
    checkpoint and `run` is the loop that calls them."""

    def __init__(self, config: TrainConfig, processes: Processes, progress: bool):
        self.config, self.processes, self.progress = config, processes, progress
        self.out_dir = Path(config.out_dir)
        self.micro_batch, self.accum_steps = batch_layout(config, processes.world)
        self.data = prepared_data(config, processes, progress)
        self.train_windows = Windows(self.data, "train", config.seq_len, shuffle=True, seed=config.seed)
        has_val = self.data.meta["splits"]["val"]["tokens"] > config.seq_len
        self.val_windows = Windows(self.data, "val", config.seq_len, shuffle=False) if has_val else None

        # The PreTrainedModel: DDP wraps it in self.model; FSDP2 shards it in place (self.model is it).
        self.unwrapped = build_model(config, self.data)
        self.n_params = sum(p.numel() for p in self.unwrapped.parameters())  # counted before sharding
        self.n_embed = self.unwrapped.get_input_embeddings().weight.numel()
        self.unwrapped.to(processes.device)
        if config.gradient_checkpointing:
            # transformers >= 5.2x names it activation checkpointing (gradient_checkpointing_enable is its
            # deprecated alias); 5.17 has only gradient_checkpointing_enable.
            enable = getattr(self.unwrapped, "activation_checkpointing_enable", None)
            (enable or self.unwrapped.gradient_checkpointing_enable)()
        self.parallel = parallelism(config.parallel, processes.world)
        self.model = self.parallel.wrap(self.unwrapped, processes)
        # Built after sharding: fully_shard replaces the parameters with sharded ones.
        groups = param_groups(self.model, config.weight_decay, config.temperature_lr_scale)
        for group in groups:
            group["lr"] = config.lr * group["lr_scale"]
        self.optimizer = torch.optim.AdamW(
            groups, lr=config.lr, betas=config.betas, eps=config.adam_eps,
            fused=True,  # one kernel for all parameters (CPU and CUDA, DTensors included)
        )
        self.scheduler = lr_scheduler(config, self.optimizer)
        device = processes.device
        bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        self.step = self.samples = 0  # optimizer steps taken; training sequences read (a function of the step)
        self.resumed_from: Path | None = None

    def restore(self) -> None:
        """Continues from the checkpoint that `resume` names, if any: weights, optimizer, schedule,
        step and data position, and each process's RNG states when the process count is the same."""
        found = checkpoint.restore_point(self.config.resume, self.out_dir, self.unwrapped)
        if found is None:
            return
        path, state, weights = found
        config, optimizer = self.config, self.optimizer
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, weights, options=full)
        set_optimizer_state_dict(self.model, optimizer, state["optimizer"], options=full)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.samples = state["step"], state["samples"]
        # The schedule of this run's config from the saved step on: the same as before unless lr,
        # min_lr, warmup_steps or max_steps were changed (e.g. to extend a run).
        self.scheduler.base_lrs = [config.lr * group.get("lr_scale", 1.0) for group in optimizer.param_groups]
        for group, base in zip(optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self.scheduler.lr_lambdas[0](self.step)
        if len(state["rng"]) == self.processes.world:
            checkpoint.set_rng_state(state["rng"][self.processes.rank])
        self.resumed_from = path

    def loss(self, batch: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy of `[B, seq_len + 1]` token windows."""
        with self.autocast:
            logits = self.model(input_ids=batch[:, :-1], use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction=reduction)

    def train_step(self) -> dict:
        """One optimizer step over `batch_size` sequences: this process's `accum` micro-batches of
        them, the mean loss over all; returns the step's train/ metrics."""
        config, processes, micro = self.config, self.processes, self.micro_batch
        loss_sum = torch.zeros((), device=processes.device)
        for m in range(self.accum_steps):
            first = self.samples + (m * processes.world + processes.rank) * micro
            batch = self.train_windows.batch(range(first, first + micro)).to(processes.device, non_blocking=True)
            with self.parallel.accumulating(self.model, last=m == self.accum_steps - 1):
                loss = self.loss(batch)
                (loss / self.accum_steps).backward()
            loss_sum += loss.detach()
        grad_norm = self.parallel.full_norm(torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.samples += config.batch_size
        loss = processes.mean(loss_sum / self.accum_steps).item()
        return {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm.item()}

    @torch.no_grad()
    def held_out_loss(self) -> float:
        """Mean held-out loss (nats per token) over the first `eval_batches * batch_size` windows of the
        split. Every process runs the same number of forwards (FSDP gathers weights collectively)."""
        config, processes, windows = self.config, self.processes, self.val_windows
        n = min(len(windows), config.eval_batches * config.batch_size) // processes.world * processes.world
        mine = list(range(processes.rank, n, processes.world))
        totals = torch.zeros(2, dtype=torch.float64, device=processes.device)
        self.model.eval()
        for i in range(0, len(mine), self.micro_batch):
            batch = windows.batch(mine[i : i + self.micro_batch]).to(processes.device)
            totals[0] += self.loss(batch, reduction="sum").double()
            totals[1] += batch[:, 1:].numel()
        self.model.train()
        processes.sum_(totals)
        return (totals[0] / totals[1]).item()

    def save(self) -> Path | None:
        """Checkpoint of the current step: every process gives its part of the full state, rank 0
        writes it (and returns its path; the others None)."""
        processes = self.processes
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.model, options=opts)
        optim_sd = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        rngs = processes.gather(checkpoint.rng_state())
        path = None
        if processes.main:
            trainer_state = {"step": self.step, "samples": self.samples, "optimizer": optim_sd,
                             "scheduler": self.scheduler.state_dict(), "rng": rngs, "world_size": processes.world}
            path = checkpoint.save(self.out_dir, self.step, self.unwrapped, model_sd, self.data.tokenizer(),
                                   self.config.to_dict(), trainer_state, self.config.keep_checkpoints)
        processes.barrier()
        return path

    def describe(self) -> str:
        """The run in one line: model size, data, batch layout, and where it resumed."""
        n_params, n_embed, meta, config = self.n_params, self.n_embed, self.data.meta, self.config
        return (
            f"model: {n_params / 1e6:.2f}M parameters ({(n_params - n_embed) / 1e6:.2f}M without the input embedding); "
            f"data: {meta['splits']['train']['tokens']:,} training tokens, unigram entropy {meta['unigram_entropy']:.3f} nats; "
            f"{self.processes.world} process(es) x {self.accum_steps} accumulation step(s) x {self.micro_batch} "
            f"sequences of {config.seq_len}"
            + (f"; resumed from {self.resumed_from} at step {self.step}" if self.resumed_from else "")
        )

    def run(self) -> dict:
        """Trains to `max_steps`, logging every step, evaluating and saving at their intervals and at the end.
        A run already at `max_steps` (a finished run started again) does nothing: no history."""
        config, processes = self.config, self.processes
        if self.step >= config.max_steps:
            return {"history": [], "evals": [], "checkpoint": self.resumed_from, "step": self.step,
                    "unigram_entropy": self.data.meta["unigram_entropy"]}
        if processes.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # Rows of steps after the one this run starts from (a resumed run replays them) would be doubled.
            checkpoint.trim_metrics(self.out_dir / "metrics.jsonl", self.step)
        reporter = Reporter(config, self.out_dir, processes.main)
        talk = processes.main and self.progress
        if talk:
            log.info(self.describe())
        history, evals, last_checkpoint = [], [], self.resumed_from
        tokens_per_step = config.batch_size * config.seq_len
        bar = tqdm(total=config.max_steps, initial=self.step, unit="step", disable=not talk, dynamic_ncols=True)
        self.model.train()
        t0, t_steps = time.perf_counter(), 0
        while self.step < config.max_steps:
            metrics = self.train_step()
            step, loss, lr, t_steps = self.step, metrics["train/loss"], metrics["train/lr"], t_steps + 1
            final = step == config.max_steps
            if step % config.log_interval == 0 or final:
                metrics["train/tokens_per_s"] = t_steps * tokens_per_step / (time.perf_counter() - t0)
                if processes.device.type == "cuda":  # since the run started: activations, weights and optimizer state
                    metrics["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(processes.device) / 2**30
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{metrics['train/tokens_per_s']:,.0f}", lr=f"{lr:.2e}")
                t0, t_steps = time.perf_counter(), 0
            if self.val_windows is not None and ((config.eval_interval and step % config.eval_interval == 0) or final):
                val = self.held_out_loss()
                metrics.update({"val/loss": val, "val/ppl": math.exp(min(val, 700.0))})
                evals.append({"step": step, "loss": val})
                if talk:
                    log.info(f"step {step}: train loss {loss:.4f}, held-out loss {val:.4f} (ppl {math.exp(val):.2f})")
            metrics["tokens"] = self.samples * config.seq_len
            history.append({"step": step, **metrics})
            reporter.log(step, metrics)
            bar.update(1)
            if (config.save_interval and step % config.save_interval == 0) or final:
                last_checkpoint = self.save()
        bar.close()
        reporter.close()
        return {"history": history, "evals": evals, "checkpoint": last_checkpoint, "step": self.step,
                "unigram_entropy": self.data.meta["unigram_entropy"]}


def train(config: TrainConfig, progress: bool = True) -> dict:
    """Runs (or continues) training; returns {"history": per-step metrics of this run, "evals": [...],
    "checkpoint": the last checkpoint, "unigram_entropy": of the training data}."""
    with training_processes(config.device) as processes:
        trainer = Trainer(config, processes, progress)
        trainer.restore()
        return trainer.run()
