"""The processes of a training run: torchrun's ranks, the process group, and how the model is
wrapped for several processes (DDP or FSDP2), chosen once when the run is set up."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..devices import local_device


@dataclass
class Processes:
    """This process's place among the training processes (one, or those that torchrun started)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool  # whether this run initialised the process group (and so tears it down)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum_(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the processes, in place."""
        if self.world > 1:
            dist.all_reduce(x)
        return x

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(x)  # SUM: gloo has no AVG
            x = x / self.world
        return x

    def gather(self, obj) -> list:
        """Every process's ``obj``, by rank."""
        if self.world == 1:
            return [obj]
        objects = [None] * self.world
        dist.all_gather_object(objects, obj)
        return objects


@contextlib.contextmanager
def training_processes(device: str) -> Iterator[Processes]:
    """Reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK and joins the process group (NCCL on GPUs, gloo
    on CPUs) for the duration; `device` as TrainConfig.device (a GPU means this process's, cuda:LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = local_device(device, local, option="`device`")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = world > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        yield Processes(rank, world, local, dev, owns)
    finally:
        if owns:
            dist.destroy_process_group()


class SingleProcess:
    """The model as it is; gradients stay local."""

    def wrap(self, model: torch.nn.Module, processes: Processes) -> torch.nn.Module:
        return model

    def accumulating(self, model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """The context of one micro-batch's backward; `last`: the step's last one, whose gradients are reduced."""
        return contextlib.nullcontext()

    def full_norm(self, norm: torch.Tensor) -> torch.Tensor:
        """The gradient norm of all the parameters, from what `clip_grad_norm_` returned."""
        return norm


class DataParallel(SingleProcess):
    """DDP: every process holds the whole model; gradients are all-reduced in backward."""

    def wrap(self, model, processes):
        device_ids = [processes.local_rank] if processes.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def accumulating(self, model, last):
        # Gradients are reduced across processes only on the last accumulation step.
        return contextlib.nullcontext() if last else model.no_sync()


class FullySharded(SingleProcess):
    """FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over the processes."""

    def wrap(self, model, processes):
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.layers:  # one all-gather per block, overlapped with the previous one
            fully_shard(layer)
        fully_shard(model)  # in place: the model stays the PreTrainedModel
        return model

    def accumulating(self, model, last):
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def full_norm(self, norm):
        return norm.full_tensor()  # a DTensor: the norm over every shard


def parallelism(parallel: str, world: int) -> SingleProcess:
    """The wrapping for TrainConfig.parallel ("ddp" or "fsdp") over `world` processes."""
    if world == 1:
        return SingleProcess()
    return DataParallel() if parallel == "ddp" else FullySharded()
