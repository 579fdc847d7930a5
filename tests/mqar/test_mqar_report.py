"""The results rows: the stored JSONL files still load and tabulate, and a new row has their format."""

import json
from pathlib import Path

import pytest

from ramnet import provenance
from ramnet.mqar.presets import MQARPreset, get_preset
from ramnet.mqar.report import best_runs, format_table, load_rows
from ramnet.mqar.train import preset_data, train_run

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "mqar"
STORED_ROWS = sorted(RESULTS.glob("*.jsonl"))


def test_results_folder_has_rows():
    assert len(STORED_ROWS) >= 5  # the glob below would pass vacuously on a moved folder


@pytest.mark.parametrize("path", STORED_ROWS, ids=lambda p: p.name)
def test_stored_results_load_and_tabulate(path):
    rows = load_rows(path)
    lines = format_table(rows).splitlines()
    assert len(lines) == 2 + len(best_runs(rows))
    assert all(any(row["model"] in line for line in lines[2:]) for row in rows)


@pytest.fixture
def measured_commit(monkeypatch):
    monkeypatch.setenv(provenance.GIT_REV_ENV, "abc1234-test")
    provenance.git_revision.cache_clear()
    yield "abc1234-test"
    monkeypatch.undo()
    provenance.git_revision.cache_clear()


def test_a_new_row_has_the_stored_format(measured_commit):
    preset = MQARPreset.from_dict({**get_preset("quick"), "vocab_size": 64, "train": [[16, 2, 16]],
                                   "test": [[16, 2, 8]], "batch_size": 16, "epochs": 1, "d_models": [16]})
    row = train_run(preset, "attention", 16, 3e-3, *preset_data(preset, "cpu"), "cpu", progress=False)
    stored = json.loads(STORED_ROWS[0].read_text().splitlines()[0])
    assert set(row) == set(stored)
    assert row["git_rev"] == measured_commit and row["device"].startswith("cpu (")
    assert (row["preset"], row["ablation"], row["model"], row["mixer"]) == (
        "quick", None, "attention", preset.models["attention"]["mixer"])
