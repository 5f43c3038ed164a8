"""Halting rules from what users write, and back: the one door that the command line, the demo, the benchmark and
batch generation all go through, so they cannot disagree.

A rule is named by a method and its parameters, JSON-ready::

    full                                               every step, no rule
    sched    {"schedule": "cosine:7.5:2.5", "stat": "min", ...}   SchED (parameters of SchED.to_dict)
    prophet  {"window": 5, "answer_start": 0, "thresholds": [7.5, 5.0, 2.5], "cutoffs": [0.33, 0.67]}   Prophet

A schedule is written ``KIND:HIGH:LOW[:K]``, as a number (a constant threshold) or as a ``ThresholdSchedule`` dict.
``stat`` names a statistic of :data:`diffexit.dllm.statistics.STATISTICS` (the rules check it against the table, so a
bad name gets the same message here as everywhere).
:func:`check_halting_params` validates and normalises parameters, :func:`halting_rule` builds a fresh rule (rules
keep per-run state, so each decode needs its own), and :func:`describe_halting` says in a few words what one does.

DiffusionGemma's loop takes its own kind of rule (a ``DiffusionGemmaAdaptiveStopping``); :func:`gemma_stopping`
builds it from the same method names: ``full`` (every denoising step), ``sched`` with the parameters of
:meth:`diffexit.dllm.diffusion_gemma.SchEDStopping.to_dict` (``schedule``, ``stat``, ``q``, ``patience``).
"""

from __future__ import annotations

from typing import Optional, Sequence

from ..common.method_params import check_method_params
from ..common.schedules import ThresholdSchedule, parse_threshold
from .halting import HaltingRule, Prophet, SchED

METHODS = ("full", "sched", "prophet")
PARAMS = {
    "full": (),
    "sched": ("schedule", "stat", "q", "ignore_token_ids", "min_progress", "patience", "max_change_ratio"),
    "prophet": ("window", "answer_start", "thresholds", "cutoffs"),
}


def schedule_dict(value) -> dict:
    """A schedule as users give it (``KIND:HIGH:LOW[:K]``, a number, a dict) in its dict form."""
    threshold = parse_threshold(value)
    if not isinstance(threshold, ThresholdSchedule):
        threshold = ThresholdSchedule("constant", threshold, threshold)
    return threshold.to_dict()


def check_halting_params(method: str, params: dict, ignore_token_ids: Sequence[int] = ()) -> dict:
    """``params`` checked against ``method`` and completed: the schedule as a dict, and for SchED every parameter
    (``SchED.to_dict``), with ``ignore_token_ids`` (the tokenizer's EOS and padding) filled in for
    ``stat="mean_content"`` when not given. Raises ``ValueError`` naming the parameter and the fix."""
    check_method_params(method, params, PARAMS)
    params = dict(params)
    if "schedule" in params:
        params["schedule"] = schedule_dict(params["schedule"])
    if method == "sched" and params.get("stat") == "mean_content" and not params.get("ignore_token_ids"):
        params["ignore_token_ids"] = sorted(set(ignore_token_ids))
    rule = halting_rule(method, params)
    return params if rule is None else rule.to_dict()


def halting_rule(method: str, params: dict) -> Optional[HaltingRule]:
    """A fresh rule for ``method`` and ``params`` (see the module docstring); None for full steps."""
    if method == "full":
        return None
    params = dict(params)
    try:
        if method == "prophet":
            return Prophet(**params)
        schedule = ThresholdSchedule.from_dict(schedule_dict(params.pop("schedule"))) if "schedule" in params else None
        return SchED(schedule=schedule, **params)
    except TypeError as e:  # a parameter of the wrong type reaches the constructor
        raise ValueError(f"method {method!r}: {e}") from e


def describe_halting(rule: Optional[HaltingRule]) -> str:
    """A halting rule in a few words: ``"SchED, cosine 7.5 -> 2.5, mean"``; None is ``"full steps"``."""
    if rule is None:
        return "full steps"
    if isinstance(rule, SchED):
        return f"SchED, {rule.schedule.describe()}, {rule.stat}"
    if isinstance(rule, Prophet):
        thresholds = " / ".join(f"{t:g}" for t in rule.thresholds)
        return f"Prophet, {rule.window}-token window from {rule.answer_start}, {thresholds}"
    return repr(rule)


def halting_spec(rule: HaltingRule) -> dict:
    """``{"method", "params"}`` of a rule built from parameters (SchED, Prophet), JSON-ready; :func:`halting_from_spec`
    rebuilds it. Raises ``ValueError`` for a rule of another class (it has no parameters to save)."""
    for method, cls in (("sched", SchED), ("prophet", Prophet)):
        if type(rule) is cls:
            return {"method": method, "params": rule.to_dict()}
    raise ValueError(f"a {type(rule).__name__} has no saved form; only SchED and Prophet rules are saved with a "
                     f"pipeline (pass halting= to each call instead)")


def halting_from_spec(spec: dict) -> Optional[HaltingRule]:
    """The rule :func:`halting_spec` describes."""
    if not isinstance(spec, dict) or set(spec) != {"method", "params"}:
        raise ValueError(f"a halting spec is {{'method': ..., 'params': {{...}}}}, got {spec!r}")
    return halting_rule(spec["method"], spec["params"])


GEMMA_PARAMS = {"full": (), "sched": ("schedule", "stat", "q", "patience")}


def gemma_stopping(method: str, params: dict):
    """A fresh stopping rule for ``DiffusionGemmaForBlockDiffusion.generate``: None for ``full``, a
    ``SchEDStopping`` for ``sched`` (default schedule: SchED's, cosine 7.5 -> 2.5). Raises ``ValueError`` naming the
    method or parameter that DiffusionGemma does not take."""
    from .diffusion_gemma import SchEDStopping

    if method not in GEMMA_PARAMS:
        raise ValueError(f"method {method!r} decodes LLaDA-style loops; a DiffusionGemma model takes "
                         f"{' or '.join(GEMMA_PARAMS)}")
    extra = [k for k in params if k not in GEMMA_PARAMS[method]]
    if extra:
        raise ValueError(f"{', '.join(extra)}: not a parameter of {method!r} on a DiffusionGemma model; its "
                         f"parameters are {list(GEMMA_PARAMS[method]) or 'none'}")
    if method == "full":
        return None
    params = dict(params)
    schedule = ThresholdSchedule.from_dict(schedule_dict(params.pop("schedule", "cosine:7.5:2.5")))
    try:
        return SchEDStopping(schedule, **params)
    except TypeError as e:
        raise ValueError(f"method {method!r}: {e}") from e
