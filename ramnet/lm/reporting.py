"""Where a training run's metrics go: metrics.jsonl in the run's directory, and TensorBoard and wandb
when the config asks for them and they are installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tqdm.auto import tqdm

from .config import TrainConfig


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
