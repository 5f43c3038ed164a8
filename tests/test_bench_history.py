"""`diffexit bench text` history and --compare: one history line per run, a changed figure reported, a bad
--compare file refused before any decoding."""

import json

import pytest

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
