"""benchmarks/bench_generate.py on the CPU with tiny models: the JSON's schema, a row per model, mode
and cell, positive throughputs, and RAM-Net's static cache generating the default cache's tokens."""

import importlib.util
import json
from pathlib import Path

import pytest

from ramnet.layers import memories

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_generate.py"
spec = importlib.util.spec_from_file_location("bench_generate", SCRIPT)
bench_generate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_generate)


@pytest.fixture
def torch_step(monkeypatch):
    """The torch recurrent step in place of the fused kernel, which Triton's interpreter (on in the CPU
    tests) runs at about a second per layer and step; tests/layers/test_ram_attention_decode_step.py
    checks that the two agree."""
    monkeypatch.setattr(memories, "triton_runs_on", lambda device: False)


@pytest.mark.usefixtures("torch_step")
def test_a_tiny_cpu_sweep_writes_every_row_with_its_meta(tmp_path):
    out = tmp_path / "generate.json"
    result = bench_generate.main(["--device", "cpu", "--tiny", "--batch", "1,2", "--prompt", "8", "--new-tokens", "3",
                                  "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))  # what was returned is what was written
    meta, rows = data["meta"], data["rows"]
    for key in ("device", "torch", "transformers", "git_rev", "new_tokens", "models"):
        assert key in meta
    assert meta["new_tokens"] == 3 and meta["device"].startswith("cpu")
    assert out.with_suffix(".md").read_text().startswith("End-to-end")
    assert {(r["model"], r["B"], r["prompt"], r["mode"]) for r in rows} == {
        (m, b, 8, mode) for m in bench_generate.MODELS for b in (1, 2) for mode in bench_generate.DEFAULT_MODES}
    for row in rows:
        assert {"model", "B", "prompt", "mode", "tok_s", "ms_per_token", "status"} <= set(row)
    ran = [r for r in rows if r["status"] == "ok"]
    assert {(r["model"], r["mode"]) for r in ran} >= {("ramnet", "default"), ("ramnet", "best"), ("llama", "default"),
                                                      ("llama", "best")}
    for row in ran:
        assert row["tok_s"] > 0 and row["ms_per_token"] is not None and row["prefill_ms"] > 0
        assert row["new_tokens"] == 3
        # transformers compiles nothing on the CPU; RAM-Net's best asks its decode loop for a compiled step
        assert row["compiled"] is ((row["model"], row["mode"]) == ("ramnet", "best"))
        if row["mode"] == "best":
            # fp32 on the CPU: the static cache's steps are the dynamic cache's, token for token
            assert row["same_tokens_as_default"] is True
    caches = {(r["model"], r["mode"]): r["cache"] for r in ran}
    assert caches[("ramnet", "default")] == "RAMNetCache" and caches[("ramnet", "best")] == "RAMNetStaticCache"
    assert caches[("llama", "best")] == "StaticCache"
    # RAM-Net's static cache runs its decode loop (eager on the CPU); the dynamic cache transformers' loop
    loops = {(r["model"], r["mode"]): r["decode_loop"] for r in ran}
    assert loops[("ramnet", "best")] == "eager" and loops[("ramnet", "default")] is None
    assert loops[("llama", "best")] is None
    best = next(r for r in ran if (r["model"], r["mode"]) == ("ramnet", "best"))
    # the loop is kept between calls: the warm-up built it (eager: no capture), the timed calls reused it
    assert best["capture_ms"] == 0 and best["timed_captures"] == 0 and best["decode_loop_mib"] > 0
    for name, info in meta["models"].items():
        assert info["preset"] == bench_generate.MODELS[name]
        assert "params" in info or "skipped" in info
    gdn = [r for r in rows if r["model"] == "gated_deltanet"]
    assert all(r["status"] in ("ok", "skipped", "error") for r in gdn)
    assert all(r["status"] == "skipped" for r in gdn if r["mode"] == "best")  # fla has no better path


@pytest.mark.usefixtures("torch_step")
def test_the_eager_mode_runs_ramnets_own_loop_without_a_graph_and_others_skip_it(tmp_path):
    out = tmp_path / "generate.json"
    bench_generate.main(["--device", "cpu", "--tiny", "--models", "ramnet,llama", "--modes", "default,eager,hf_loop",
                         "--batch", "1", "--prompt", "8", "--new-tokens", "3", "--out", str(out)])
    rows = {(r["model"], r["mode"]): r for r in json.loads(out.read_text())["rows"]}
    eager, hf_loop = rows["ramnet", "eager"], rows["ramnet", "hf_loop"]
    assert eager["status"] == "ok" and eager["decode_loop"] == "eager" and eager["cache"] == "RAMNetStaticCache"
    assert hf_loop["status"] == "ok" and hf_loop["decode_loop"] is None  # transformers' loop
    assert eager["same_tokens_as_default"] is True and hf_loop["same_tokens_as_default"] is True  # fp32 on the CPU
    assert rows["llama", "eager"]["status"] == rows["llama", "hf_loop"]["status"] == "skipped"


def test_the_cells_run_in_order_of_importance():
    order = bench_generate.cell_order([1, 16, 64, 256], [8192, 512])
    assert order[:2] == [(1, 512), (64, 512)] and order[2:4] == [(1, 8192), (64, 8192)]
    assert set(order[4:]) == {(16, 512), (16, 8192), (256, 512), (256, 8192)} and len(order) == 8


@pytest.mark.usefixtures("torch_step")
def test_the_deadline_stops_the_sweep_and_keeps_what_ran(tmp_path):
    out = tmp_path / "generate.json"
    bench_generate.main(["--device", "cpu", "--tiny", "--models", "ramnet", "--modes", "default", "--batch", "1,2",
                         "--prompt", "8", "--new-tokens", "2", "--deadline-s", "0", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["rows"] == [] and data["meta"]["stopped_at_deadline"]
    assert data["meta"]["not_run"] == [dict(model="ramnet", B=b, prompt=8, mode="default") for b in (1, 2)]


@pytest.mark.usefixtures("torch_step")
def test_resume_runs_only_the_missing_cells_and_keeps_the_earlier_rows(tmp_path):
    out = tmp_path / "generate.json"
    common = ["--device", "cpu", "--tiny", "--models", "ramnet", "--prompt", "8", "--new-tokens", "3", "--out", str(out)]
    bench_generate.main(common + ["--batch", "1"])
    first = json.loads(out.read_text())["rows"]
    bench_generate.main(common + ["--batch", "1,2", "--resume"])
    data = json.loads(out.read_text())
    assert data["rows"][:2] == first  # kept as they were, not run again
    assert [(r["B"], r["mode"]) for r in data["rows"]] == [(1, "default"), (1, "best"), (2, "default"), (2, "best")]
    assert len(data["meta"]["earlier_runs"]) == 1 and all(r["git_rev"] == data["meta"]["git_rev"] for r in data["rows"])
    best = data["rows"][3]
    assert best["same_tokens_as_default"] is True and best["tokens_equal_frac"] == 1.0 and best["first_diff_step"] is None
    with pytest.raises(SystemExit):  # another configuration is not mixed in
        bench_generate.main(common + ["--batch", "1", "--new-tokens", "4", "--resume"])


def test_ramnet_best_asks_for_the_compiled_decode_loop_and_default_for_none():
    best, default = (bench_generate.generate_kwargs("ramnet", mode) for mode in ("best", "default"))
    assert best["ramnet_decode_loop"] == "compiled" and best["cache_implementation"] == "static"
    assert "ramnet_decode_loop" not in default and "cache_implementation" not in default
