"""`ramnet trace`: the recorded slots are the op's, the locality statistics are right on small streams
that can be checked by hand, and the command writes its PNG, JSON and table on CPU in well under a minute."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from trace_helpers import text, tiny_checkpoint  # noqa: E402

from ramnet.cli import main  # noqa: E402
from ramnet.lm.evaluate import load  # noqa: E402
from ramnet.ops.ram.common import decode_tokens  # noqa: E402
from ramnet.trace import belady_hit_rate, lfu_hit_rate, lru_hit_rates, record_trace, stack_distances  # noqa: E402
from ramnet.trace.analysis import access_stream  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("trace") / "tiny")


def _lru_by_simulation(slots, size):
    cache, hits = [], 0
    for s in slots:
        if s in cache:
            hits += 1
            cache.remove(s)
        elif len(cache) >= size:
            cache.pop(0)
        cache.append(s)
    return hits / len(slots)


def test_stack_distances_and_lru_hit_rates_match_a_direct_simulation():
    slots = np.array([1, 2, 1, 3, 2, 1, 4, 4, 1])
    assert stack_distances(slots).tolist() == [-1, -1, 1, -1, 2, 2, -1, 0, 1]
    rng = np.random.default_rng(0)
    stream = rng.zipf(1.5, 3000) % 97
    distances = stack_distances(stream)
    sizes = [1, 2, 5, 10, 40, 97]
    assert lru_hit_rates(distances, sizes) == pytest.approx([_lru_by_simulation(stream.tolist(), c) for c in sizes])
    for c in sizes:  # Belady's optimum bounds every policy; with room for every slot all caches only miss cold
        assert belady_hit_rate(stream, c) >= max(lfu_hit_rate(stream, c), _lru_by_simulation(stream.tolist(), c)) - 1e-12
    cold = len(np.unique(stream)) / len(stream)
    assert lfu_hit_rate(stream, 97) == pytest.approx(1 - cold) == belady_hit_rate(stream, 97)


def test_lfu_keeps_the_frequent_slot_where_lru_drops_it():
    stream = np.array([0, 0, 0, 1, 2, 0, 3, 4, 0])
    assert lfu_hit_rate(stream, 2) == pytest.approx(4 / 9)  # 0 stays: hits at 1, 2, 5, 8
    assert lru_hit_rates(stack_distances(stream), [2])[0] == pytest.approx(2 / 9)  # 0 goes at 4 and at 7


def test_access_stream_takes_each_slot_once_per_token_writes_first():
    slots, tokens = access_stream(np.array([[3, 1], [2, 3]]), np.array([[1, 5], [2, 2]]))
    assert slots.tolist() == [3, 1, 5, 2, 3] and tokens.tolist() == [0, 0, 0, 1, 1]


def test_recorded_slots_are_the_ops_and_recording_changes_nothing(ckpt):
    model, tok = load(ckpt, torch.device("cpu"))
    ids = torch.tensor([tok(text(1)).input_ids[:96]])
    with torch.no_grad():
        logits = model(ids).logits
        traces = record_trace(model, ids)
        assert torch.equal(model(ids).logits, logits)  # the wrappers are gone, and changed nothing
    assert [t.layer for t in traces] == [0, 1, 2, 3]
    attn = model.model.layers[0].attn
    captured = {}
    hook = model.model.layers[0].attn_norm.register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    with torch.no_grad():
        model(ids)
    hook.remove()
    with torch.no_grad():
        q, k, _, _ = attn.project(captured["x"])
    w_idx, w_w, _, r_idx, r_w = decode_tokens(q, k, attn.memory.spec(q), torch.arange(ids.shape[1])[None])
    assert np.array_equal(traces[0].write_idx, w_idx.numpy()) and np.array_equal(traces[0].read_idx, r_idx.numpy())
    assert np.allclose(traces[0].write_w, w_w.numpy()) and np.allclose(traces[0].read_w, r_w.numpy())
    assert traces[0].cape == (True, True, False, False)
    # Read in chunks through the cache, and one token at a time (the decoding step, interpreted Triton on
    # the CPU in the tests: a few tokens only): the same slots.
    for chunk, length in ((40, 50), (1, 6)):
        again = record_trace(model, ids[:, :length], layers=[0, 2], chunk_size=chunk)
        assert [t.layer for t in again] == [0, 2]
        assert np.array_equal(again[0].write_idx, traces[0].write_idx[:, :length])
        assert np.array_equal(again[1].read_idx, traces[2].read_idx[:, :length])


def test_the_command_writes_png_json_and_table_in_under_a_minute(ckpt, tmp_path, capsys):
    (tmp_path / "in.txt").write_text(text(6))
    start = time.perf_counter()
    assert main(["trace", "--model", str(ckpt), "--text-file", str(tmp_path / "in.txt"), "--max-tokens", "1024",
                 "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert time.perf_counter() - start < 60
    out = capsys.readouterr().out
    assert "LRU@10%" in out and "mean hit rate, LFU" in out and "BELADY" in out and "LRU with that prefetch" in out
    assert (tmp_path / "out" / "trace.png").stat().st_size > 10_000
    result = json.loads((tmp_path / "out" / "trace.json").read_text())
    summary = result["summary"]
    assert summary["memory_slots"] == 64 and summary["topk"] == 4 and summary["tokens"] == 1024
    assert summary["cache_slots"] == [3, 6, 16, 32] and len(summary["per_head"]) == 16
    for sim in summary["mean_lru_prefetch"]:
        assert 0 <= sim["hit_rate"] <= 1 and sim["fetched_per_token"] >= 0
        assert sim["used"] is None or 0 <= sim["used"] <= 1
    assert result["meta"]["git_rev"] is None or isinstance(result["meta"]["git_rev"], str)
    first = result["traces"][0]
    assert np.array(first["write_idx"]).shape == (1, 1024, 4, 4)
    for entry in summary["per_head"]:  # more cache never hits less; the optimum bounds LRU and LFU
        lru, lfu, opt = (entry["hit_rate"][p] for p in ("lru", "lfu", "belady"))
        assert lru == sorted(lru) and all(o >= max(a, b) - 1e-12 for a, b, o in zip(lru, lfu, opt))


def test_mqar_input_some_layers_and_heads_and_bad_arguments(ckpt, tmp_path, capsys):
    assert main(["trace", "--model", str(ckpt), "--mqar", "64,8,2", "--layers", "1", "--heads", "0,3", "--no-plot",
                 "--no-slots", "--budgets", "0.1,0.5", "--out", str(tmp_path), "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "trace.json").read_text())["summary"]
    assert summary["sequences"] == 2 and summary["layers"] == [1] and summary["heads"] == [0, 3]
    assert summary["cache_slots"] == [6, 32] and not (tmp_path / "trace.png").exists()
    capsys.readouterr()
    for argv, message in ((["--text", "x", "--layers", "7"], "not RAM layers"), (["--text", "x", "--heads", "9"], "heads"),
                          (["--text", "x", "--mqar", "8,2"], "exactly one input"), (["--text", "x", "--budgets", "2"],
                                                                                    "--budgets")):
        assert main(["trace", "--model", str(ckpt), "--device", "cpu", "--out", str(tmp_path), *argv]) == 2
        assert message in capsys.readouterr().err


def test_prefetch_prediction_from_the_last_tokens_slots():
    from ramnet.trace.analysis import predicted_by_last_token

    slots, tokens = np.array([5, 6, 5, 7, 4, 9]), np.array([0, 0, 1, 1, 2, 2])
    assert predicted_by_last_token(slots, tokens, 16, cape=False).tolist() == [False, False, True, False, False, False]
    # CAPE: a slot repeats one lower a token later (7 -> 6 would be caught, 5 -> 4 is)
    assert predicted_by_last_token(slots, tokens, 16, cape=True).tolist() == [False, False, True, False, True, False]


def test_a_simulated_prefetch_catches_a_cape_heads_stripes_and_pollutes_where_it_guesses_wrong():
    from ramnet.trace.analysis import lru_hit_rates, lru_prefetch

    def stream(per_token):
        slots = np.array([s for row in per_token for s in row])
        return slots, np.repeat(np.arange(len(per_token)), [len(row) for row in per_token])

    # A CAPE head choosing the same two addresses: its slots move down one a token, all cold for LRU.
    stripes = stream([[(3 - t) % 16, (9 - t) % 16] for t in range(8)])
    assert lru_hit_rates(stack_distances(stripes[0]), [4]) == [0.0]
    caught = lru_prefetch(*stripes, size=4, memory_slots=16, cape=True)
    assert caught == dict(hit_rate=14 / 16, fetched_per_token=14 / 8, used=1.0)
    # A content head repeating its slots: the last token's slots are resident, nothing is fetched.
    bands = stream([[2, 5]] * 6)
    assert lru_prefetch(*bands, size=4, memory_slots=16, cape=False) == dict(
        hit_rate=lru_hit_rates(stack_distances(bands[0]), [4])[0], fetched_per_token=0.0, used=None)
    # Taken for a CAPE head, the same stream gets wrong guesses that evict the slots it needs from a 2-slot cache.
    wrong = lru_prefetch(*bands, size=2, memory_slots=16, cape=True)
    assert wrong["hit_rate"] == 0.0 and wrong["used"] == 0.0 and wrong["fetched_per_token"] == 10 / 6


@pytest.mark.parametrize("tokens, topk", [(64, 4), (2048, 8), (8192, 8)])
def test_the_plot_draws_every_access_however_long_the_trace(tmp_path, tokens, topk):
    # The marker shrinks with the trace's length; at 2048 tokens x K 8 it once fell below what Agg draws
    # and the trained `small` checkpoint's plot came out as empty panels. Both colours must show: red (writes)
    # and green (reads).
    pytest.importorskip("matplotlib")
    from PIL import Image

    from ramnet.trace.record import LayerTrace
    from ramnet.trace.report import plot_traces

    rng = np.random.default_rng(0)
    M = 64
    shape = (1, tokens, 2, topk)
    write_idx = rng.integers(0, M // 2, shape)  # writes in the lower half of the slots, reads in the upper
    read_idx = rng.integers(M // 2, M, shape)
    weights = np.full(shape, 1.0 / topk, dtype=np.float32)
    trace = LayerTrace(0, M, topk, (False, False), write_idx, weights, read_idx, weights)
    path = plot_traces([trace], [0, 1], tmp_path / "trace.png")
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    red = (rgb[..., 0] - rgb[..., 1] > 60).mean()
    green = (rgb[..., 1] - rgb[..., 0] > 40).mean()
    assert red > 0.001 and green > 0.001, (red, green)
