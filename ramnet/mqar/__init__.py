"""MQAR (multi-query associative recall): the synthetic task, its model and baselines, presets,
sweeps and their results (``ramnet mqar``)."""

from .data import generate
from .model import MQARModel
from .presets import PRESETS, MQARPreset, get_preset
from .report import best_runs, format_table, load_rows
from .sweep import RunsFailed, run_preset

__all__ = ["generate", "MQARModel", "PRESETS", "MQARPreset", "get_preset", "run_preset", "RunsFailed",
           "best_runs", "format_table", "load_rows"]
