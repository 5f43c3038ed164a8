"""One parameter check for both floors' methods (text halting, image exits): the same words for the same mistake."""

import pytest

from diffexit.common.method_params import check_method_params
from diffexit.dllm.rule_spec import check_halting_params
from diffexit.uem.rule_spec import check_exit_params

TABLE = {"a": ("x", "shared"), "b": ("shared",), "c": ()}


@pytest.mark.parametrize("method, params, message", [
    ("d", {}, "unknown method 'd'; choose one of ['a', 'b', 'c']"),
    ("c", {"y": 1}, "unknown parameter 'y'; the parameters are ['shared', 'x']"),
    ("b", {"x": 1}, "x is a parameter of method 'a', not of 'b'; drop it or pick --method a"),
    ("c", {"shared": 1}, "shared is a parameter of method 'a' and 'b', not of 'c'; drop it or pick --method a"),
])
def test_the_message_names_the_problem_and_the_fix(method, params, message):
    with pytest.raises(ValueError) as e:
        check_method_params(method, params, TABLE)
    assert str(e.value) == message


def test_a_method_s_own_parameters_pass():
    check_method_params("a", {"x": 1, "shared": 2}, TABLE)


def test_both_floors_name_every_method_a_parameter_belongs_to():
    with pytest.raises(ValueError, match=r"^min_depth is a parameter of method 'deediff' and 'similarity', not of "
                                         r"'static'; drop it or pick --method deediff$"):
        check_exit_params("static", {"depths": [2], "min_depth": 1})
    with pytest.raises(ValueError, match=r"^window is a parameter of method 'prophet', not of 'sched'; drop it or "
                                         r"pick --method prophet$"):
        check_halting_params("sched", {"window": 3})
