"""Where a training run's metrics go: metrics.jsonl in the run's directory, and TensorBoard and wandb
when the config's `report_to` asks for them (none by default; asking for one that is not installed is
an error naming its install)."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from .config import TrainConfig

log = logging.getLogger(__name__)


# report_to's sinks: the module each needs, and how to install it.
SINKS = {"tensorboard": ("tensorboard", "pip install 'ramnet[tensorboard]'"), "wandb": ("wandb", "pip install wandb")}


def check_report_to(report_to: list[str]) -> None:
    """Raise ValueError for a sink in ``report_to`` whose package is not installed, naming the install."""
    for sink in report_to:
        module, install = SINKS[sink]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"`report_to` has {sink!r}, but {module} is not installed: {install}, or leave it out "
                             f"(report_to=[] logs to out_dir/metrics.jsonl only)")


class Reporter:
    """metrics.jsonl always; TensorBoard and wandb when asked for. Rank 0 only."""

    def __init__(self, config: TrainConfig, out_dir: Path, enabled: bool):
        self.jsonl = self.tb = self.wandb = None
        if not enabled:
            return
        check_report_to(config.report_to)
        self.jsonl = open(out_dir / "metrics.jsonl", "a")
        if "tensorboard" in config.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        if "wandb" in config.report_to:
            import wandb

            try:
                self.wandb = wandb.init(project=config.wandb_project, config=config.to_dict(), dir=str(out_dir))
            except Exception as err:  # e.g. installed but not logged in: train anyway, with the other logs
                log.warning(f"wandb: not logging ({type(err).__name__}: {err}); leave wandb out of report_to to skip it")

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
