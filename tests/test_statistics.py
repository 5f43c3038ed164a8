"""The table of halting statistics: every surface reads it, so a bad name gets one message everywhere, and each
entry's sign is the sign its values really have."""

import json

import pytest
import torch

from diffexit.app.calibrate_sched import main as calibrate_main
from diffexit.app.demo.text import MAX_THRESHOLD, threshold_bounds
from diffexit.dllm.calibrate import SCAN_STATS, load_sched
from diffexit.dllm.diffusion_gemma import STATS as GEMMA_STATS
from diffexit.dllm.diffusion_gemma import SchEDStopping
from diffexit.dllm.halting import STATS, SchED, span_statistic
from diffexit.dllm.rule_spec import check_halting_params, gemma_stopping
from diffexit.dllm.statistics import (BLOCK, CANVAS, SPAN, STATISTICS, check_stat, describe, names,
                                      scanned_names)
from diffexit.kernels import token_stats
from diffexit.samplers import SchEDScheduler, ThresholdSchedule

SCHEDULE = ThresholdSchedule("constant", 1.0, 1.0)


def _message(build) -> str:
    with pytest.raises(ValueError) as e:
        build()
    return str(e.value)


def _cli_message(stat, capsys) -> str:
    with pytest.raises(SystemExit):
        calibrate_main(["--risk", "0.1", "--stat", stat])
    return capsys.readouterr().err.strip().splitlines()[-1].split("argument --stat: ", 1)[1]


@pytest.mark.parametrize("bad", ["entropy", "bogus", "Mean"])
def test_a_bad_stat_gets_the_same_message_on_every_surface(bad, capsys):
    expected = _message(lambda: check_stat(bad, SPAN))
    assert expected == _message(lambda: check_stat(bad, CANVAS)) == _message(lambda: check_stat(bad, BLOCK))
    surfaces = {
        "SchED": lambda: SchED(SCHEDULE, stat=bad),
        "SchEDStopping": lambda: SchEDStopping(SCHEDULE, stat=bad),
        "SchEDScheduler": lambda: SchEDScheduler(stat=bad),
        "rule_spec sched": lambda: check_halting_params("sched", {"stat": bad}),
        "rule_spec gemma": lambda: gemma_stopping("sched", {"stat": bad}),
    }
    for surface, build in surfaces.items():
        assert _message(build) == expected, surface
    assert _cli_message(bad, capsys) == expected


def test_the_old_entropy_name_names_the_new_one(tmp_path):
    assert "stat 'entropy' is now 'max_entropy'" in _message(lambda: SchED(SCHEDULE, stat="entropy"))
    saved = tmp_path / "sched.json"
    saved.write_text(json.dumps({"sched": {"schedule": SCHEDULE.to_dict(), "stat": "entropy"}}))
    assert "is now 'max_entropy'" in _message(lambda: load_sched(saved))


def test_a_stat_of_another_surface_says_where_it_is_read(capsys):
    on_span = _message(lambda: SchED(SCHEDULE, stat="mean_entropy"))
    assert "DiffusionGemma canvas" in on_span and repr(list(names(SPAN))) in on_span
    on_canvas = _message(lambda: SchEDStopping(SCHEDULE, stat="max_entropy"))
    assert "masked span" in on_canvas and repr(list(names(CANVAS))) in on_canvas
    assert repr(list(names(BLOCK))) in _message(lambda: SchEDScheduler(stat="mean_content"))
    assert "not scanned by calibration" in _cli_message("max_entropy", capsys)


def test_every_surface_lists_the_table():
    assert STATS == names(SPAN) and GEMMA_STATS == names(CANVAS) and SCAN_STATS == scanned_names()
    assert "max_entropy" in STATS and "entropy" not in STATS and "mean_entropy" not in STATS
    assert set(names(BLOCK)) <= set(names(SPAN))
    for surface in (SPAN, BLOCK, CANVAS):
        help_line = describe(surface)
        assert all(f"{n}:" in help_line for n in names(surface))


def test_each_statistic_has_the_sign_of_its_table_entry():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11) * 3
    stats = token_stats(logits)
    masked = torch.rand(3, 7) < 0.6
    masked[:, 0] = True
    for name in names(SPAN):
        value = span_statistic(stats, masked, name, ignore_token_ids=[0])
        entry = STATISTICS[name]
        assert entry.bounds[0] <= value.min() and value.max() <= entry.bounds[1], name
    for name in names(CANVAS):
        value = SchEDStopping(SCHEDULE, stat=name).statistic(logits)
        entry = STATISTICS[name]
        assert entry.bounds[0] <= value.min() and value.max() <= entry.bounds[1], name


def test_the_demo_form_takes_thresholds_of_the_statistic_sign():
    assert threshold_bounds(STATISTICS["min"]) == (0.0, MAX_THRESHOLD)
    assert threshold_bounds(STATISTICS["max_entropy"]) == (-MAX_THRESHOLD, 0.0)
    assert threshold_bounds(STATISTICS["mean_entropy"]) == (-MAX_THRESHOLD, 0.0)
