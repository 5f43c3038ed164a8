"""Schedules and diffusers-compatible schedulers.

``ThresholdSchedule`` is light and imported eagerly. The diffusers schedulers import diffusers, so they
load on first access.
"""

from .schedules import KINDS, ThresholdSchedule, progress

_LAZY = {
    "SchEDScheduler": ".sched_scheduler",
    "ExitAwareScheduler": ".exit_scheduler",
}

__all__ = ["KINDS", "ThresholdSchedule", "progress", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
