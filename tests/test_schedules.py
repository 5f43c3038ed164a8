import math

import pytest

from diffexit.samplers import ThresholdSchedule, progress

HIGH, LOW = 7.5, 2.5


@pytest.mark.parametrize("kind,k,expected", [
    ("constant", None, (7.5, 7.5, 7.5)),
    ("linear", None, (7.5, 5.0, 2.5)),
    ("cosine", None, (7.5, 5.0, 2.5)),
    ("exp", 4.0, (7.5, 2.5 + 5.0 * math.exp(-2.0), 2.5 + 5.0 * math.exp(-4.0))),
    ("step", None, (7.5, 5.0, 2.5)),
])
def test_values_at_0_half_1(kind, k, expected):
    s = ThresholdSchedule(kind, HIGH, LOW, k=k)
    assert [s(0.0), s(0.5), s(1.0)] == pytest.approx(list(expected))


def test_cosine_and_linear_shapes_differ_between_ends():
    cos, lin = ThresholdSchedule("cosine", HIGH, LOW), ThresholdSchedule("linear", HIGH, LOW)
    assert cos(0.25) > lin(0.25) and cos(0.75) < lin(0.75)


def test_step_thirds():
    s = ThresholdSchedule("step", HIGH, LOW)
    assert [s(0.33), s(1 / 3), s(0.66), s(2 / 3)] == [7.5, 5.0, 5.0, 2.5]


def test_progress():
    assert progress(0, 1) == 0.0
    assert [progress(i, 5) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="step must be in"):
        progress(5, 5)
    with pytest.raises(ValueError, match="total_steps"):
        progress(0, 0)


@pytest.mark.parametrize("args,match", [
    (("cosine", 1.0, 2.0), "swap them"),
    (("linear", 1.0, 2.0), "high=1.0 < low=2.0"),
    (("exp", 7.5, 2.5), "k > 0"),
    (("cosine", 7.5, 2.5, 4.0), "only applies to kind='exp'"),
    (("sigmoid", 7.5, 2.5), "kind must be one of"),
    (("linear", float("nan"), 2.5), "finite"),
])
def test_errors(args, match):
    with pytest.raises(ValueError, match=match):
        ThresholdSchedule(*args)


def test_out_of_range_progress_and_round_trip():
    s = ThresholdSchedule("exp", 7.5, 2.5, k=4.0)
    with pytest.raises(ValueError, match="progress must be in"):
        s(1.5)
    assert ThresholdSchedule.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="unknown ThresholdSchedule fields"):
        ThresholdSchedule.from_dict({"kind": "linear", "high": 1, "low": 0, "slope": 2})


@pytest.mark.parametrize("kind,k", [("constant", None), ("linear", None), ("cosine", None), ("exp", 3.0),
                                    ("step", None)])
def test_vectorised_values_match_scalar_calls(kind, k):
    import torch

    s = ThresholdSchedule(kind, 7.5, 2.5, k=k)
    p = torch.linspace(0, 1, 13)
    assert s.values(p).tolist() == pytest.approx([s(float(x)) for x in p], abs=1e-5)


def test_bool_and_missing_fields_are_refused():
    with pytest.raises(ValueError, match="finite number"):
        ThresholdSchedule("linear", True, 0.0)
    with pytest.raises(ValueError, match="missing"):
        ThresholdSchedule.from_dict({"kind": "linear", "high": 1.0})
