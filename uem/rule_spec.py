"""Exit rules from what users write, and back: the one door that the command line, the demo, the benchmark and batch
generation all go through, so they cannot disagree.

A rule is named by a method and its parameters, JSON-ready::

    full                                       every block (through the same hook)
    deediff  {"threshold": 0.1}                UncertaintyThreshold(0.1)
    deediff  {"threshold": "linear:0.3:0.05"}  a ThresholdSchedule over sampling progress (or its dict)
    deediff  {"threshold": 0.1, "min_depth": 4} MinDepth(UncertaintyThreshold(0.1), 4)
    deediff  {"budget": 0.02}                  the CalibratedThreshold of calibration-0.02.json beside the UEMs
    deediff  {"calibration": "path.json"}      the CalibratedThreshold of that calibration file
    static   {"depths": [4, 8, 12]}            StaticDepth((4, 8, 12))
    similarity {"tolerance": 0.05}             SimilarityExit(0.05): MuE's training-free exit, no heads
    similarity {"tolerance": 0.05, "min_depth": 4}
    similarity {"calibration": "path.json"}    per-step tolerances calibrated on the relative change

:func:`check_exit_params` validates and normalises them (thresholds in their JSON form), :func:`exit_rule` builds the
rule, and :func:`describe_exit_rule` says in a few words what a rule does.
"""

from __future__ import annotations

import math
from typing import Optional

from ..common.method_params import check_method_params
from ..common.schedules import ThresholdSchedule, parse_threshold, threshold_to_json
from .calibration_file import Calibration
from .exit_rules import (CalibratedThreshold, ExitRule, FullDepth, MinDepth, SimilarityExit, StaticDepth,
                         UncertaintyThreshold)

METHODS = ("full", "deediff", "static", "similarity")
PARAMS = {"full": (), "deediff": ("threshold", "min_depth", "budget", "calibration"), "static": ("depths",),
          "similarity": ("tolerance", "min_depth", "calibration")}
CALIBRATED = ("budget", "calibration")


def check_exit_params(method: str, params: dict) -> dict:
    """``params`` checked against ``method`` and normalised (thresholds as numbers or schedule dicts).

    Raises ``ValueError`` naming the parameter and the fix. A ``budget`` is only checked to be a positive number
    here, and a ``calibration`` to be a path; the file is read by :meth:`Calibration.checked_rule`.
    """
    check_method_params(method, params, PARAMS)
    params = dict(params)
    if method == "static" and "depths" not in params:
        raise ValueError("method 'static' needs depths (--depths or 'depths' in --config)")
    if method == "similarity":
        given = [k for k in ("tolerance", "calibration") if k in params]
        if len(given) != 1:
            raise ValueError("method 'similarity' needs a tolerance on the relative change (say 0.05) or a "
                             f"calibration file, one of the two; got {given or 'neither'}")
        if "calibration" in params:
            if "min_depth" in params:
                raise ValueError("min_depth goes with a tolerance: a calibration sets its own minimum depths")
            params["calibration"] = str(params["calibration"])
        else:
            params["tolerance"] = threshold_to_json(parse_threshold(params["tolerance"]))
    if method == "deediff":
        given = [k for k in ("threshold", *CALIBRATED) if k in params]
        if len(given) != 1:
            raise ValueError("method 'deediff' needs a threshold (--threshold) or a calibration (a budget, --budget, "
                             f"or a file, --calibration), one of the two; got {given or 'neither'}")
        if given[0] in CALIBRATED and "min_depth" in params:
            raise ValueError("--min-depth goes with --threshold: a calibration sets its own minimum depths")
        if "budget" in params:
            budget = params["budget"]
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < math.inf:
                raise ValueError(f"budget must be a finite number > 0, got {budget!r}")
        elif "calibration" in params:
            params["calibration"] = str(params["calibration"])
        else:
            params["threshold"] = threshold_to_json(parse_threshold(params["threshold"]))
    if not any(k in params for k in CALIBRATED):
        exit_rule(method, params)  # the rule's own checks (ranges, depths) fail here, before anything loads
    return params


def exit_rule(method: str, params: dict, calibration: Optional[Calibration] = None) -> ExitRule:
    """The rule that ``method`` and ``params`` name (see the module docstring).

    ``calibration`` is required for a ``budget`` or a ``calibration`` file (the caller finds and checks it: that
    needs the model, the UEMs and the sampling setup); raises ``ValueError`` for bad values.
    """
    if method == "full":
        return FullDepth()
    if method == "static":
        return StaticDepth(params["depths"])
    if any(k in params for k in CALIBRATED):
        if calibration is not None and (method == "similarity") != (calibration.statistic == "change"):
            raise ValueError(f"this calibration bounds the {calibration.statistic} statistic, which method "
                             f"{method!r} does not read; use it with method "
                             f"{'similarity' if calibration.statistic == 'change' else 'deediff'}")
        if calibration is None:
            raise ValueError("a calibrated rule needs its calibration: pass "
                             "calibration=Calibration.load(find_calibration(uem_dir, budget))")
        if "budget" in params and float(calibration.budget) != float(params["budget"]):
            raise ValueError(f"the calibration is for budget {calibration.budget:g}, not {params['budget']:g}")
        return calibration.rule()
    if method == "similarity":
        rule = SimilarityExit(parse_threshold(params["tolerance"]))
    else:
        rule = UncertaintyThreshold(parse_threshold(params["threshold"]))
    return MinDepth(rule, params["min_depth"]) if "min_depth" in params else rule


def describe_exit_rule(rule: ExitRule) -> str:
    """An exit rule in a few words: ``"DeeDiff, threshold 0.1"``, ``"static depth 4/8/12"``, ``"off (full depth)"``."""
    if isinstance(rule, FullDepth):
        return "off (full depth)"
    if isinstance(rule, CalibratedThreshold):
        who = "similarity exit" if rule.statistic == "change" else "DeeDiff"
        return f"{who}, calibrated to budget {rule.budget:g}"
    if isinstance(rule, StaticDepth):
        return "static depth " + "/".join(map(str, rule.depths))
    if isinstance(rule, MinDepth):
        return f"{describe_exit_rule(rule.rule)}, at least {'/'.join(map(str, rule.depths))} blocks"
    if isinstance(rule, SimilarityExit):
        tolerance = rule.threshold
        return "similarity exit, " + (tolerance.describe() if isinstance(tolerance, ThresholdSchedule)
                                      else f"tolerance {tolerance:g}")
    if isinstance(rule, UncertaintyThreshold):
        if isinstance(rule.threshold, ThresholdSchedule):
            return f"DeeDiff, {rule.threshold.describe()}"
        return f"DeeDiff, threshold {rule.threshold:g}"
    return repr(rule)
