"""The frontier: Pareto points of a hand-made case, the model families of the figure, the Markdown
table, and the figure files."""

import pytest

from ramnet.mqar.report import markdown_table, model_families, pareto_frontier, run_group, shown_rows


def _row(model, state, acc, d_model=64, lr=1e-3, **extra):
    return {"preset": "p", "model": model, "d_model": d_model, "lr": lr, "state_size": state, "avg_accuracy": acc,
            "seed": 0, "epochs_run": 4, "protocol": {"epochs": 32}, "mixer": {"name": model},
            "accuracy": {"L64/N4": acc, "L128/N8": acc}, **extra}


def test_pareto_frontier_of_a_hand_made_case():
    points = [(10, 0.3), (20, 0.2), (20, 0.5), (30, 0.5), (5, 0.1), (40, 0.9), (50, 0.9), (60, 0.95),
              (15, 0.3), (None, 1.0)]
    front = pareto_frontier(points, state=lambda p: p[0], accuracy=lambda p: p[1])
    # (20, 0.2) and (15, 0.3) lose to (10, 0.3); (30, 0.5) to (20, 0.5); (50, 0.9) to (40, 0.9); no state: out
    assert front == [(5, 0.1), (10, 0.3), (20, 0.5), (40, 0.9), (60, 0.95)]
    assert pareto_frontier([]) == []
    # points equal in both: the first; one point: itself
    a, b = _row("a", 10, 0.5), _row("b", 10, 0.5)
    assert pareto_frontier([a, b]) == [a] and pareto_frontier([b]) == [b]
    # a better point at a smaller state removes every point after it that is not better
    rows = [_row("x", 100, 0.8), _row("y", 1000, 0.7), _row("z", 50, 0.9)]
    assert [r["model"] for r in pareto_frontier(rows)] == ["z"]


def test_model_families_join_the_sizes_of_one_model():
    def ram(name, u, dp=4, k=8):
        return {**_row(name, 1, 0.5), "mixer": {"name": "ramnet", "kwargs": {
            "num_partitions": u, "partition_dim": dp, "topk": k}}}

    def raven(name, slots):
        return {**_row(name, 1, 0.5), "mixer": {"name": "fla.Raven", "kwargs": {"num_slots": slots, "topk": 32}}}

    rows = [ram("ramnet M=16", 2), ram("ramnet", 4), ram("ramnet M=4096", 6), ram("ramnet K=16", 4, k=16),
            raven("raven", 64), raven("raven slots=256", 256), _row("attention", 1, 1.0),
            ram("ramnet U2 d_p16", 2, dp=16), ram("ramnet U3 d_p16 M=4096", 3, dp=16)]
    families = model_families(rows)
    assert [families[run_group(r)] for r in rows] == [
        "ramnet (partition_dim=4)", "ramnet (partition_dim=4)", "ramnet (partition_dim=4)", "ramnet K=16",
        "raven", "raven", "attention", "ramnet (partition_dim=16)", "ramnet (partition_dim=16)"]
    assert set(model_families(rows[:3]).values()) == {"ramnet"}


def test_shown_rows_drop_screen_runs_of_models_with_final_runs():
    rows = [_row("a", 10, 0.5, stage="screen"), _row("a", 10, 0.6, stage="final"),
            _row("b", 20, 0.4, stage="screen"), _row("c", 30, 0.9)]
    assert [(r["model"], r.get("stage")) for r in shown_rows(rows)] == [("a", "final"), ("b", "screen"), ("c", None)]


def test_markdown_table_is_sorted_by_state_and_marks_the_frontier_per_d_model():
    rows = [_row("big", 1000, 0.99), _row("small", 10, 0.5), _row("worse", 100, 0.4), _row("small", 10, 0.2, lr=1e-2),
            _row("wide", 20, 0.3, d_model=128)]
    lines = markdown_table(rows).splitlines()
    assert lines[0] == "| model | d_model | state | lr | epochs | avg | L64/N4 | L128/N8 |"
    body = [line.split(" | ") for line in lines[2:6]]
    assert [cells[0].strip("| ") for cells in body] == ["small", "wide", "worse", "big"] and lines[6] == ""
    marked = {cells[0].strip("| ") for cells in body if cells[5].endswith("*")}
    assert marked == {"small", "big", "wide"}  # "worse" loses to "small"; "wide" is alone at d_model 128
    assert "0.001" in lines[2] and "4/32" in lines[2]  # the best lr of "small"; epochs run / given
    assert "1,000" in markdown_table(rows)


@pytest.mark.filterwarnings("ignore:No artists with labels")
def test_the_frontier_figures_are_written(tmp_path):
    from ramnet.mqar.plot import plot_results

    rows = [_row(f"ramnet M={m}", 2 * m * 33, acc) for m, acc in ((16, 0.3), (256, 0.8), (4096, 0.99))]
    rows += [_row("attention", 131264, 1.0), _row("delta_net", 2240, 0.75), _row("delta_net", 8576, 0.95, d_model=128),
             _row("ramnet", 17088, 0.9, d_model=128), _row("ramnet M=4096", 532864, 0.98, d_model=128),
             _row("screened", 5000, 0.1, stage="screen"), _row("screened", 5000, 0.2, stage="final")]
    paths = plot_results(rows, tmp_path)
    assert sorted(p.name for p in paths) == ["mqar_accuracy_vs_state.png", "mqar_frontier.png"]
    for path in paths:
        assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000
