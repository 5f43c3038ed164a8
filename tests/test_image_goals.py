"""The #28 goal read off bench rows: the cheapest composed row against the cheapest single technique per PSNR level."""

import pytest

from diffexit.app.bench.image_goals import goals_block, is_composed


def row(method, family, cost, psnr, b16=None, identical=False, skipped=None):
    r = {"method": method, "family": family, "layer_ratio": cost, "psnr": None if identical else psnr,
         "identical_to_full": identical, "speedup_wall_b16": b16 if b16 is not None else 1 / cost}
    if skipped:
        r["skipped"] = skipped
    return r


ROWS = [
    row("full", "full", 1.0, 28.7),
    row("full-base", "base", 1.0, None, identical=True),
    row("steps-3", "steps", 0.3, 19.8),
    row("taylorseer-4-1", "taylorseer", 0.3, 23.1),
    row("taylorseer-2-1", "taylorseer", 0.5, 24.7),
    row("steps-7", "steps", 0.7, 27.2),
    row("a+b", "composed", 0.2, 20.4),  # beats 0.3 at 20 dB by 0.67x
    row("c+d", "composed", 0.25, 23.1, b16=2.0),  # 0.83x of 0.3 at 23 dB: too dear
    row("cal-8", "deediff-exit-cost-calibrated-8-steps", 0.45, 25.5),  # exits with fewer steps: composed
    row("skipped+row", "composed", None, None, b16=0.0, skipped="no heads"),
]


def test_each_level_pairs_the_cheapest_rows_reaching_it():
    goals = goals_block(ROWS)
    by_level = {level["psnr"]: level for level in goals["levels"]}
    assert [by_level[20.0][k]["method"] for k in ("single", "composed")] == ["taylorseer-4-1", "a+b"]
    assert by_level[20.0]["cost_share"] == pytest.approx(0.2 / 0.3) and by_level[20.0]["met"]
    assert [by_level[23.0][k]["method"] for k in ("single", "composed")] == ["taylorseer-4-1", "c+d"]
    assert by_level[23.0]["cost_share"] == pytest.approx(0.25 / 0.3) and not by_level[23.0]["met"]
    # At 25 dB the single technique is fewer steps; the calibration at its own step count is the composed row.
    assert [by_level[25.0][k]["method"] for k in ("single", "composed")] == ["steps-7", "cal-8"]
    assert by_level[25.0]["met"]  # 0.45 / 0.7 = 0.64
    assert goals["levels_met"] == 2 and goals["met"]


def test_a_composed_row_slow_on_the_clock_does_not_meet_a_level():
    slow = [r if r["method"] != "a+b" else {**r, "speedup_wall_b16": 0.7 / 0.2} for r in ROWS]
    level = goals_block(slow)["levels"][0]
    assert level["wall_share"] == pytest.approx(0.7) and not level["met"]


def test_a_level_no_row_reaches_is_not_met():
    level = goals_block([row("steps-3", "steps", 0.3, 19.8), row("a+b", "composed", 0.2, 20.4)])["levels"][1]
    assert level["single"] is None and level["composed"] is None and not level["met"]


def test_references_and_families_are_told_apart():
    assert is_composed(row("x", "composed", 0.5, 20)) and is_composed(row("y", "deediff-paper-calibrated-8-steps",
                                                                            0.5, 20))
    assert not any(is_composed(row("z", f, 0.5, 20)) for f in ("steps", "taylorseer", "deediff-paper-calibrated"))
    # Bit-identical images reach every level; the references themselves never count as a technique.
    goals = goals_block([row("full-base", "base", 1.0, None, identical=True), row("same", "static", 0.9, None,
                                                                                 identical=True)])
    assert goals["levels"][2]["single"]["method"] == "same"
