"""`diffexit bench text --quick` end to end on a tiny random model: every method, every field, the plots."""

import json

import pytest
import torch

from diffexit.app.cli import main as cli
from diffexit.app.bench.text import all_methods

FIELDS = {"task", "method", "params", "score", "full_score", "agreement", "nfe", "speedup_nfe", "speedup_wall", "qps4"}


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
    stats = {r["params"].get("stat") for r in result["rows"] if r["task"] == "all"}
    assert {"mean", "median", "quantile", "min", "mean_content", "entropy"} <= stats
    for task in (*tasks, "all"):
        rows = [r for r in result["rows"] if r["task"] == task]
        assert {r["method"] for r in rows} == names
        for r in rows:
            assert FIELDS <= set(r)
            assert r["nfe"] > 0 and r["speedup_wall"] > 0
    full = [r for r in result["rows"] if r["method"] == "full" and r["task"] == "add"][0]
    one = [r for r in result["rows"] if r["method"] == "one-step" and r["task"] == "add"][0]
    assert full["nfe"] == 16 and full["speedup_nfe"] == 1.0 and full["agreement"] == 1.0
    assert one["nfe"] == 1 and one["speedup_nfe"] == 16.0
    for task in tasks:
        by = {r["method"]: r for r in result["rows"] if r["task"] == task}
        # The flag compares one step with generate()'s full steps, not with the pipeline's baseline.
        want = by["one-step"]["score"] >= by["full"]["score"]
        assert all(r["one_step_matches_full"] == want for r in by.values())
    assert (out / "pareto.png").stat().st_size > 0 and (out / "trace.png").stat().st_size > 0


def test_bench_text_quick(tmp_path, tiny_text_model):
    _bench(tmp_path, tiny_text_model, ["add"])


@pytest.mark.slow
def test_bench_text_quick_long_form(tmp_path, tiny_text_model):
    _bench(tmp_path, tiny_text_model, ["add", "chain"])
