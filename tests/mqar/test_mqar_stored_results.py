"""What is stored with the results: the preset files still load, the JSONL rows still load and
tabulate, and a new row has their format."""

import json
from pathlib import Path

import pytest

from ramnet import provenance
from ramnet.mqar.presets import MQARPreset, get_preset, read_preset_file
from ramnet.mqar.report import best_runs, format_table, load_rows
from ramnet.mqar.train import preset_data, train_run

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "mqar"
STORED_CONFIGS = sorted(RESULTS.glob("*_config.json"))
STORED_ROWS = sorted(RESULTS.glob("*.jsonl"))


def test_results_folder_has_presets_and_rows():
    # the globs below would pass vacuously on a moved folder
    assert len(STORED_CONFIGS) >= 2 and len(STORED_ROWS) >= 5


@pytest.mark.parametrize("path", STORED_CONFIGS, ids=lambda p: p.name)
def test_stored_preset_files_still_load(path):
    raw = json.loads(path.read_text())
    preset = MQARPreset.from_dict(read_preset_file(path))
    assert preset.name == raw["name"] and preset.models == raw["models"] and preset.train == raw["train"]
    assert preset.ablation is None  # written before presets had the key: absent means "not an ablation"


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
    # rows from before the protocol and the two-stage protocol's stage were stored lack them
    assert set(row) == set(stored) | {"protocol", "stage"} and row["stage"] is None
    assert row["protocol"] == {"vocab_size": 64, "train": [[16, 2, 16]], "test": [[16, 2, 8]], "batch_size": 16,
                               "test_batch_size": 32, "epochs": 1, "weight_decay": 0.1, "early_stop": 0.99}
    assert row["git_rev"] == measured_commit and row["device"].startswith("cpu (")
    assert (row["preset"], row["ablation"], row["model"], row["mixer"]) == (
        "quick", None, "attention", preset.models["attention"]["mixer"])
