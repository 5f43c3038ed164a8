"""`diffexit bench text --quick` end to end on a tiny random model: every method, every field, the plots."""

import json

import pytest
import torch

from diffexit.app.cli import main as cli
from diffexit.app.bench.text import all_methods, block_methods

FIELDS = {"task", "method", "family", "params", "score", "full_score", "agreement", "nfe", "speedup_nfe",
          "speedup_wall", "qps4", "seconds", "seconds_spread", "repeats", "noisy", "halts", "passes_over_oracle"}


def _per_task(result, task, tasks):
    """The per-task rows of ``task`` by method, one dict per task the row averages (a task stands for itself)."""
    members = [task] if task in tasks else [t for t in tasks if (t in ("reverse", "add")) == (task == "controls")]
    return [{r["method"]: r for r in result["rows"] if r["task"] == t} for t in members]


def _bench(tmp_path, tiny_text_model, tasks):
    model, tok = tiny_text_model(layers=1, max_positions=272)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out = tmp_path / "bench"
    rc = cli(["bench", "text", "--quick", "--n", "2", "--batch", "2", "--tasks", *tasks,
              "--model", str(tmp_path / "model"), "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    assert result["benchmark"] == "text" and result["quick"] is True
    names = {m.name for m in all_methods((tok.eos_token_id, tok.pad_token_id))}
    groups = ["controls"] + (["discriminating"] if set(tasks) - {"reverse", "add"} else [])
    assert {r["task"] for r in result["rows"]} == {*tasks, *groups}
    stats = {r["params"].get("stat") for r in result["rows"] if r["task"] == "controls"}
    assert {"mean", "median", "quantile", "min", "mean_content", "max_entropy"} <= stats
    assert {r["params"]["cache"] for r in result["rows"]} == {None, "prefix", "dual"}
    assert {r["model"] for r in result["rows"]} == {str(tmp_path / "model")}
    # One bidirectional model: its own full row is the bidirectional baseline; no block-causal goals to report.
    assert all(r["speedup_wall_vs_bidirectional"] == pytest.approx(r["speedup_wall"]) for r in result["rows"]
               if r["baseline"] == "full")
    assert result["goals"]["model"] is None
    goal = result["goals"]["halting_vs_oracle"]
    if "discriminating" not in groups:
        assert goal is None  # no discriminating task, so no halting goal either
    else:
        disc = {r["method"]: r for r in result["rows"] if r["task"] == "discriminating"}
        assert goal["model"] == str(tmp_path / "model") and goal["agreement_at_least"] == 0.995
        assert goal["oracle_speedup_nfe"] == disc["oracle-halt"]["speedup_nfe"]
        assert goal["speedup_nfe_at_least"] == pytest.approx(disc["oracle-halt"]["speedup_nfe"] / 1.15)
        rules = [r for r in disc.values() if r["halts"] and r["baseline"] == "full" and r["params"]["cache"] is None
                 and r["params"]["parallel_threshold"] is None and not r["method"].startswith("oracle")
                 and r["agreement"] >= 0.995]
        best = max((r["speedup_nfe"] for r in rules), default=None)
        assert goal["met"] == (best is not None and best >= goal["speedup_nfe_at_least"])
    for task in (*tasks, *groups):
        rows = [r for r in result["rows"] if r["task"] == task]
        assert {r["method"] for r in rows} == names
        for r in rows:
            assert FIELDS <= set(r)
            assert r["nfe"] > 0
            assert (r["speedup_wall"] is None) == (r["method"] == "oracle-commit")  # counted on the recording
            if r["speedup_wall"] is not None:
                assert r["speedup_wall"] > 0 and r["repeats"] >= 3 and r["seconds_spread"] >= 0
                assert isinstance(r["noisy"], bool)
            # Every halting row, and only those, reports its passes over the halting oracle's.
            assert (r["passes_over_oracle"] is not None) == (r["halts"] and r["baseline"] == "full")
        by = {r["method"]: r for r in rows}
        assert by["oracle-halt"]["agreement"] == 1.0 and by["oracle-halt"]["nfe"] <= by["full"]["nfe"]
        assert by["prophet"]["passes_over_oracle"] == pytest.approx(
            sum(by2["prophet"]["nfe"] / by2["oracle-halt"]["nfe"] for by2 in _per_task(result, task, tasks))
            / len(_per_task(result, task, tasks)))
    full = [r for r in result["rows"] if r["method"] == "full" and r["task"] == "add"][0]
    one = [r for r in result["rows"] if r["method"] == "one-step" and r["task"] == "add"][0]
    assert full["nfe"] == 16 and full["speedup_nfe"] == 1.0 and full["agreement"] == 1.0
    assert one["nfe"] == 1 and one["speedup_nfe"] == 16.0
    for task in tasks:
        by = {r["method"]: r for r in result["rows"] if r["task"] == task}
        # The flag compares one step with generate()'s full steps, not with the pipeline's baseline.
        want = by["one-step"]["score"] >= by["full"]["score"]
        assert all(r["one_step_matches_full"] == want for r in by.values())
    # A cache changes how much each pass runs, not how many passes full steps take.
    for cache in ("prefix", "dual"):
        cached = [r for r in result["rows"] if r["method"] == f"full+{cache}" and r["task"] == "add"][0]
        assert cached["nfe"] == 16 and cached["baseline"] == "full"
    for summary in groups:
        rows = [r for r in result["rows"] if r["task"] == summary]
        members = [t for t in tasks if (t in ("reverse", "add")) == (summary == "controls")]
        assert all(r["tasks"] == sorted(members) for r in rows)
        by = {(r["task"], r["method"]): r for r in result["rows"]}
        for r in rows:
            assert r["score"] == pytest.approx(sum(by[(t, r["method"])]["score"] for t in members) / len(members))
    for plot in ("pareto.png", "wall.png", "trace.png"):
        assert (out / plot).stat().st_size > 0


def test_bench_text_quick(tmp_path, tiny_text_model):
    _bench(tmp_path, tiny_text_model, ["add"])


@pytest.mark.slow
def test_bench_text_quick_long_form(tmp_path, tiny_text_model):
    _bench(tmp_path, tiny_text_model, ["add", "chain"])


def test_bench_text_both_embedded_models(tmp_path, capsys):
    out = tmp_path / "bench"
    assert cli(["bench", "text", "--quick", "--n", "2", "--batch", "2", "--tasks", "add", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    rows = {(r["model"], r["task"], r["method"]): r for r in result["rows"]}
    # Both embedded models ship a learned commit rule, so both get its rows.
    learned = {"learned-commit", "learned-halt", "learned-commit+prefix", "learned-halt+prefix"}
    block = {r["method"] for r in result["rows"] if r["model"] == "charlm-block" and r["task"] == "add"}
    assert block == {m.name for m in block_methods()} | learned
    assert learned <= {r["method"] for r in result["rows"] if r["model"] == "charlm"}
    for (model, task, method), r in rows.items():
        assert r["block_causal"] == (model == "charlm-block")
        assert {"cache", "parallel_threshold"} <= set(r["params"])
        assert r["baseline"] in ("full", "llada2-stock")
        bidirectional_full = rows[("charlm", task, "full")]["seconds"]
        if method == "oracle-commit":  # counted on the recording, never timed
            assert r["seconds"] is None and r["speedup_wall_vs_bidirectional"] is None
        else:
            assert r["speedup_wall_vs_bidirectional"] == pytest.approx(bidirectional_full / r["seconds"])
    # Each model is measured against its own uncached full steps, which the exact prefix cache reproduces.
    for model in ("charlm", "charlm-block"):
        assert rows[(model, "add", "full")]["agreement"] == 1.0 and rows[(model, "add", "full")]["speedup_wall"] == 1.0
        assert rows[(model, "add", "full+prefix")]["agreement"] == 1.0
    goals = result["goals"]
    assert goals["model"] == "charlm-block" and goals["cached_full_agrees"] is True
    assert goals["discriminating"] is None and goals["chain"] is None  # the run has neither
    assert "charlm-block" in capsys.readouterr().out


def test_bench_text_unknown_model_is_one_line(tmp_path, capsys):
    assert cli(["bench", "text", "--models", "nosuch", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffexit bench text: error: cannot load the text model nosuch") and "\n" not in err
    assert err.count("cannot load") == 1
    with pytest.raises(SystemExit):
        cli(["bench", "text", "--models", "charlm", "--model", str(tmp_path), "--out", str(tmp_path)])


def test_methods_runs_the_matching_rows_and_full_steps(tmp_path, tiny_text_model, capsys):
    model, tok = tiny_text_model(layers=1)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    run = ["bench", "text", "--quick", "--n", "2", "--batch", "2", "--tasks", "add", "--model", str(tmp_path / "model"),
           "--out", str(tmp_path / "bench")]
    assert cli([*run, "--methods", "parallel*", "oracle-halt"]) == 0
    result = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert {r["method"] for r in result["rows"]} == {"full", "oracle-halt", "parallel", "parallel+prefix",
                                                     "parallel+dual"}
    # A pipeline row keeps the stock pipeline it is measured against.
    assert cli([*run, "--methods", "llada2-sched"]) == 0
    result = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert {r["method"] for r in result["rows"]} == {"full", "llada2-sched", "llada2-stock"}
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli([*run, "--methods", "parallel", "nosuch*"])
    err = capsys.readouterr().err
    assert "--methods nosuch* matches no method" in err and "parallel+prefix" in err and "sched-cosine" in err
