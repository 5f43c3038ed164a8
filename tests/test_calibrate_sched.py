"""`diffexit calibrate sched`: conformal scale selection, its monotonicity in the risk, the parameter file."""

import json
import random

import pytest
import torch

from diffexit.app.cli import main as cli
from diffexit.dllm.calibrate import Trajectory, evaluate, family, load_sched, select_scale, wilson
from diffexit.dllm.halting import SchED


def synthetic(n=200, steps=16, seed=0):
    """Trajectories whose statistic rises with progress; halting before a sample's 'settle' step changes it."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        settle = rng.randrange(steps)
        slope = rng.uniform(2, 12)
        values = [slope * (t + 1) / steps + rng.uniform(-0.5, 0.5) for t in range(steps)]
        progress = [t / (steps - 1) for t in range(steps)]
        answers = ["wrong" if t < settle else "right" for t in range(steps)]
        out.append(Trajectory(values, progress, answers, "right"))
    return out


def test_smaller_risk_is_more_conservative():
    cal = synthetic()
    scales = {r: select_scale(cal, "cosine", r)[0] for r in (0.02, 0.05, 0.1, 0.2, 0.4)}
    ordered = [scales[r] for r in sorted(scales)]
    assert all(s is not None for s in ordered)
    assert ordered == sorted(ordered, reverse=True)  # smaller risk -> larger thresholds
    assert len(set(ordered)) > 1


def test_bound_holds_in_calibration_and_roughly_on_fresh_data():
    cal, fresh = synthetic(seed=1), synthetic(n=2000, seed=2)
    for risk in (0.05, 0.1, 0.2):
        scale, scan = select_scale(cal, "cosine", risk)
        chosen = [s for s in scan if s["scale"] == scale][0]
        assert chosen["bound"] <= risk
        assert evaluate(cal, family("cosine", scale))["rate"] <= risk
        # Conformal control bounds the expected rate; on 2000 fresh samples the rate stays near it.
        assert evaluate(fresh, family("cosine", scale))["rate"] <= risk + 0.03


def test_no_scale_when_risk_is_below_what_n_allows():
    cal = synthetic(n=10)
    scale, scan = select_scale(cal, "linear", 0.05)  # bound >= 1/11
    assert scale is None and scan[0]["bound"] > 0.05


def test_outcome_and_wilson():
    tr = Trajectory([1.0, 3.0, 8.0], [0.0, 0.5, 1.0], ["a", "b", "c"], "c")
    assert tr.outcome(family("linear", 1.0)) == ("c", 3)   # thresholds 7.5, 5, 2.5: first met at step 2
    assert tr.outcome(family("linear", 0.1)) == ("a", 1)   # 0.75 <= 1.0 at step 0
    lo, hi = wilson(0, 100)
    assert lo == 0.0 and 0.02 < hi < 0.05


def test_cli_writes_a_file_that_round_trips(tmp_path, tiny_text_model):
    model, tok = tiny_text_model(layers=1, max_positions=272)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "sched.json"
    rc = cli(["calibrate", "sched", "--risk", "0.5", "--tasks", "add", "pick", "--n-cal", "3", "--n-val", "2",
              "--model", str(tmp_path / "m"), "--stat", "mean_content", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["validation"]["n"] == 4 and data["calibration"]["n"] == 6
    rule = load_sched(out)
    assert isinstance(rule, SchED) and rule.stat == "mean_content"
    assert rule.ignore_token_ids == (tok.eos_token_id, tok.pad_token_id)
    assert SchED.from_dict(rule.to_dict()).to_dict() == rule.to_dict()


def test_bad_inputs(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a SchED parameter file"):
        load_sched(bad)
    with pytest.raises(ValueError, match="cannot read"):
        load_sched(tmp_path / "missing.json")
    with pytest.raises(SystemExit):
        cli(["calibrate", "sched", "--risk", "0.001", "--n-cal", "5", "--tasks", "add"])


def test_an_unwritable_out_is_refused_before_the_calibration(tmp_path, capsys, monkeypatch):
    import diffexit.app.calibrate_sched as calibrate_sched

    def no_model(*args):
        raise AssertionError("the model must not load when --out cannot be written")

    monkeypatch.setattr(calibrate_sched, "load_text_model_or_embedded", no_model)
    for out, message in ((tmp_path, "is a folder; give the path of the JSON file"),
                         (tmp_path / "missing" / "s.json", "does not exist; create it")):
        with pytest.raises(SystemExit):
            cli(["calibrate", "sched", "--risk", "0.2", "--tasks", "add", "--out", str(out)])
        assert message in capsys.readouterr().err


def test_a_block_causal_model_is_refused_in_one_line_before_any_recording(tmp_path, capsys, monkeypatch):
    from diffexit.app import calibrate_sched
    from diffexit.app.calibrate_sched import main

    def recorded(*args, **kwargs):
        raise AssertionError("the refusal must come before the first recorded batch")

    monkeypatch.setattr(calibrate_sched, "record_task", recorded)
    assert main(["--risk", "0.2", "--model", "charlm-block", "--tasks", "pick", "--n-cal", "4", "--n-val", "2",
                 "--out", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert "a block-causal model halts per block" in err and "--model charlm" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
    assert not (tmp_path / "s.json").exists()
