"""The demo's form values: limits, choices, and the checks that turn a bad value into a one-line ``gr.Error``."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import gradio as gr

from ...common.schedules import KINDS as SCHEDULE_KINDS
from ...common.schedules import ThresholdSchedule
from ...dllm.kv_cache import CACHES as KV_CACHES

MAX_IMAGES = 16
MAX_IMAGE_STEPS = 200
MAX_TEXT_STEPS = 512
# The text tab's KV cache choices: none, or the loop's (dllm.kv_cache.CACHES).
CACHE_NONE = "none"
CACHES = (CACHE_NONE, *KV_CACHES)


def int_checkboxes(choices: Sequence[tuple[str, int]], **kwargs) -> gr.CheckboxGroup:
    """A ``gr.CheckboxGroup`` of ``(label, int)`` choices, typed ``list[int]`` in the API schema.

    gradio types every CheckboxGroup's items as strings whatever its values, and ``gradio_client`` prints any enum
    as string literals, so ``view_api()`` told callers to send ``['3']``, which the server's own choice check then
    refused (the choice is the int 3). The schema names the valid values in words instead of an enum. The schema is
    set on the instance: a subclass of a gradio component makes gradio write a ``.pyi`` beside this file.
    """
    boxes = gr.CheckboxGroup(list(choices), **kwargs)
    schema = {"type": "array", "title": "Checkbox Group",
              "items": {"type": "integer", "description": f"one of {[value for _, value in choices]}"}}
    boxes.api_info = lambda: schema
    return boxes


def _error(message: str) -> gr.Error:
    # A user's mistake, not a server fault: no traceback in the server log.
    return gr.Error(message, print_exception=False)


def _as_int(name: str, value, low: int, high: Optional[int] = None) -> int:
    """``value`` as an int in ``[low, high]`` (a float with an integer value counts), else gr.Error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value):
        raise _error(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise _error(f"{name} must be {bound}, got {value}")
    return value


def _as_float(name: str, value, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _error(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise _error(f"{name} must be in [{low:g}, {high:g}], got {value:g}")
    return float(value)


def _choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise _error(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _schedule(kind, high, low, k, *, what: str, bounds: tuple[float, float]):
    """A ``ThresholdSchedule`` from the form; ``bounds`` is the range the compared statistic lives in."""
    kind = _choice(f"{what} schedule kind", kind, SCHEDULE_KINDS)
    high = _as_float(f"{what} threshold 'high'", high, *bounds)
    low = high if kind == "constant" else _as_float(f"{what} threshold 'low'", low, *bounds)
    rate = _as_float("exp decay rate k", k) if kind == "exp" else None
    try:
        return ThresholdSchedule(kind, high, low, k=rate)
    except ValueError as e:
        raise _error(str(e)) from e
