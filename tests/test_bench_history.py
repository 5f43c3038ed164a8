"""`diffexit bench text` history and --compare: one history line per run, a changed figure reported, a bad
--compare file refused before any decoding; issue #31's goal (2) on synthetic rows."""

import json

import pytest

from diffexit.app.bench.history import goal_lines, learned_goal
from diffexit.app.cli import main as cli


def _run(tmp_path, tiny_text_model, *extra):
    model, tok = tiny_text_model(layers=1)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    return cli(["bench", "text", "--quick", "--n", "2", "--batch", "2", "--tasks", "add",
                "--model", str(tmp_path / "model"), "--out", str(tmp_path / "bench"), *extra])


def test_history_and_compare(tmp_path, tiny_text_model, capsys):
    assert _run(tmp_path, tiny_text_model) == 0
    history = tmp_path / "bench" / "history.jsonl"
    first = [json.loads(line) for line in history.read_text().splitlines()]
    assert len(first) == 1
    assert {"time", "commit", "platform", "threads", "torch", "goals", "summaries"} <= set(first[0])
    assert {(s["task"], s["method"]) for s in first[0]["summaries"]} >= {("controls", "full")}
    # An earlier run whose full-steps agreement on add was half: the comparison shows the change.
    earlier = json.loads((tmp_path / "bench" / "results.json").read_text())
    row = next(r for r in earlier["rows"] if r["task"] == "add" and r["method"] == "full")
    row["agreement"] = 0.5
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    capsys.readouterr()
    assert _run(tmp_path, tiny_text_model, "--compare", str(tmp_path / "earlier.json")) == 0
    out = capsys.readouterr().out
    changed = [line for line in out.splitlines() if "| add | full |" in line]
    assert len(changed) == 1 and "| 1.000 | +0.500 |" in changed[0]
    assert "| add | one-step |" not in out  # unchanged per-task rows are not listed
    assert len(history.read_text().splitlines()) == 2


@pytest.mark.parametrize("content, message", [(None, "no such file"), ("{not json", "not a readable JSON file"),
                                              ('{"benchmark": "image", "rows": []}', "not a bench text results"),
                                              ('{"benchmark": "text", "rows": [{"task": "add"}]}', "row 0 lacks")])
def test_compare_refuses_bad_file_before_decoding(tmp_path, capsys, content, message):
    path = tmp_path / "earlier.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit):
        # --model names a folder that does not exist: reaching the loader would say so instead.
        cli(["bench", "text", "--model", str(tmp_path / "missing"), "--compare", str(path), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert message in err and "cannot load" not in err
    assert not (tmp_path / "history.jsonl").exists()


def _row(model, method, family, agreement, speedup, task="discriminating"):
    return {"model": model, "task": task, "method": method, "family": family, "agreement": agreement,
            "speedup_nfe": speedup}


def test_learned_goal_takes_the_best_row_of_each_family_at_the_agreement():
    rows = [_row("m", "parallel", "parallel", 1.0, 2.0), _row("m", "parallel+prefix", "parallel", 0.99, 9.0),
            _row("m", "learned-commit", "learned-commit", 0.996, 3.2),
            _row("m", "learned-commit+prefix", "learned-commit", 0.99, 20.0),
            _row("m", "learned-halt", "learned-halt", 1.0, 50.0), _row("m", "parallel", "parallel", 1.0, 99.0, "chain"),
            _row("other", "parallel", "parallel", 1.0, 2.0)]  # no learned rows: left out
    goal = learned_goal(rows)
    assert set(goal) == {"m"}
    g = goal["m"]
    # Rows below 99.5% and rows of other families or task groups do not count.
    assert g["learned"] == {"method": "learned-commit", "agreement": 0.996, "speedup_nfe": 3.2}
    assert g["parallel"] == {"method": "parallel", "agreement": 1.0, "speedup_nfe": 2.0}
    assert g["ratio"] == pytest.approx(1.6) and g["met"] is True
    rows[2]["speedup_nfe"] = 2.9
    assert learned_goal(rows)["m"]["met"] is False
    line = [line for line in goal_lines({"learned_vs_parallel": learned_goal(rows)}) if "learned-commit" in line]
    assert len(line) == 1 and "not met" in line[0] and "learned-commit 2.90x at 99.6%" in line[0]
    assert "parallel 2.00x at 100.0%" in line[0] and "ratio 1.45" in line[0]
    # No learned-commit row at the agreement: no ratio, not met, and the line says so.
    rows[2]["agreement"] = 0.99
    g = learned_goal(rows)["m"]
    assert g["learned"] is None and g["ratio"] is None and g["met"] is False
    assert "no learned-commit row at the agreement" in goal_lines({"learned_vs_parallel": {"m": g}})[0]
