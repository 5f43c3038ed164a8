"""Exit rules on their own: what they decide, and what they refuse."""

import pytest
import torch

from diffexit.samplers import ThresholdSchedule
from diffexit.uem import ExitRule, FullDepth, MinDepth, StaticDepth, UncertaintyThreshold


def never_called():
    raise AssertionError("this rule should not compute the uncertainty")


def test_constant_threshold_is_strict():
    rule = UncertaintyThreshold(0.3)
    assert rule.exits(2, None, lambda: torch.tensor([0.1, 0.3, 0.5])).tolist() == [True, False, False]
    assert UncertaintyThreshold(0.0).exits(1, None, lambda: torch.tensor([0.0])).tolist() == [False]
    assert UncertaintyThreshold(1).threshold == 1.0


def test_schedule_threshold_follows_progress():
    rule = UncertaintyThreshold(ThresholdSchedule("linear", 0.4, 0.1))
    assert rule.threshold_at(0.0) == pytest.approx(0.4)
    assert rule.threshold_at(1.0) == pytest.approx(0.1)
    assert rule.exits(1, 0.5, lambda: torch.tensor([0.2, 0.3])).tolist() == [True, False]
    with pytest.raises(ValueError, match="ExitAwareScheduler"):
        rule.threshold_at(None)
    assert UncertaintyThreshold(ThresholdSchedule("constant", 0.2, 0.2)).threshold_at(None) == 0.2


@pytest.mark.parametrize("bad", [1.01, -1e-9, float("inf"), False, None, ThresholdSchedule("cosine", 1.0, -0.5)])
def test_threshold_outside_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match="threshold"):
        UncertaintyThreshold(bad)


def test_static_depth_cuts_progress_into_equal_stretches():
    rule = StaticDepth([4, 8, 12])
    assert [rule.depth_at(p) for p in (0.0, 0.33, 0.34, 0.66, 0.67, 1.0)] == [4, 4, 8, 8, 12, 12]
    assert rule.exits(4, 0.1, never_called) and not rule.exits(3, 0.1, never_called)
    assert StaticDepth([5]).depth_at(None) == 5
    with pytest.raises(ValueError, match="progress"):
        rule.depth_at(None)
    rule.check(12)
    with pytest.raises(ValueError, match="asks for 12 blocks, but the model has only 11"):
        rule.check(11)


@pytest.mark.parametrize("bad", [[], [0], [2.5], [True]])
def test_bad_depths_are_refused(bad):
    with pytest.raises(ValueError, match="StaticDepth"):
        StaticDepth(bad)


def test_min_depth_defers_only_from_its_depth_on():
    rule = MinDepth(UncertaintyThreshold(0.5), 3)
    assert rule.needs_uem
    assert rule.exits(2, None, never_called) is False
    assert rule.exits(3, None, lambda: torch.tensor([0.1, 0.9])).tolist() == [True, False]
    assert not MinDepth(StaticDepth([2]), 2).needs_uem
    with pytest.raises(ValueError, match="exceeds"):
        rule.check(2)
    with pytest.raises(ValueError, match="asks for 9"):
        MinDepth(StaticDepth([9]), 1).check(8)
    with pytest.raises(ValueError, match="ExitRule"):
        MinDepth(0.5, 2)
    with pytest.raises(ValueError, match="minimum depth"):
        MinDepth(FullDepth(), 0)


def test_full_depth_never_exits_and_needs_no_uem():
    rule = FullDepth()
    assert not rule.needs_uem and rule.exits(1, None, never_called) is False
    assert isinstance(rule, ExitRule)
