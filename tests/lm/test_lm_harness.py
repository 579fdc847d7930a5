"""lm-evaluation-harness through the `ramnet` model name, offline, on two tiny local tasks (a
multiple-choice one and a rolling-loglikelihood one, as wikitext). Skipped without lm-eval."""

import json
import textwrap

import pytest
from lm_helpers import one_thread, prepared_data, tiny_config  # noqa: F401  (autouse fixture)

from ramnet.cli import main
from ramnet.lm.train import train

pytest.importorskip("lm_eval")

TASKS = {
    "ramnet_tiny_choice": """
        task: ramnet_tiny_choice
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: answer
        metric_list:
          - metric: acc
    """,
    "ramnet_tiny_rolling": """
        task: ramnet_tiny_rolling
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{{{question}}}}"
        metric_list:
          - metric: word_perplexity
          - metric: bits_per_byte
    """,
}
DOCS = [
    {"question": "The for statement is used to", "choices": [" iterate over a sequence.", " banana."], "answer": 0},
    {"question": "A function returns", "choices": [" purple.", " a value."], "answer": 1},
    {"question": "The while loop repeats", "choices": [" while a condition is true.", " never."], "answer": 0},
]


def test_lm_eval_runs_the_ramnet_model_offline(tmp_path_factory, tmp_path, monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data = prepared_data(tmp_path_factory)
    ckpt = train(tiny_config(data, tmp_path / "run", "max_steps=10", "eval_interval=0", "save_interval=0"), progress=False)["checkpoint"]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, yaml in TASKS.items():
        (tasks / f"{name}.yaml").write_text(textwrap.dedent(yaml).format(data=docs))
    out = tmp_path / "results"
    assert main(["eval", "harness", "--model", "ramnet", "--model_args", f"pretrained={ckpt}", "--device", "cpu", "--batch_size", "2",
                 "--tasks", ",".join(TASKS), "--include_path", str(tasks), "--output_path", str(out)]) == 0
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert 0 <= results["ramnet_tiny_choice"]["acc,none"] <= 1
    assert results["ramnet_tiny_rolling"]["word_perplexity,none"] > 1
    assert results["ramnet_tiny_rolling"]["bits_per_byte,none"] > 0
