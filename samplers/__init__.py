"""diffusers swap-ins for both methods: schedulers that a pipeline takes unchanged.

- ``SchEDScheduler`` (sched_scheduler): SchED halting for diffusers' ``LLaDA2Pipeline``, a drop-in
  ``BlockRefinementScheduler``.
- ``ExactCacheLLaDA2Pipeline`` (exact_cache_pipeline): ``LLaDA2Pipeline`` for a block-causal model, writing the K/V of
  the prompt and finished blocks once and running each step over the current block, with the stock pipeline's tokens.
- ``ExitAwareScheduler`` (exit_scheduler): wraps any diffusers scheduler to tell DeeDiff early exits the sampling
  progress and to record the depths they ran.
- ``attach_early_exits`` / ``detach_early_exits`` (early_exits): one call that puts an ``EarlyExitConfig``'s exits
  on a pipeline (heads, backbone, calibration, rule, hook and scheduler wrap), and one that takes them off.

This floor sits above both engines (``diffexit.dllm``, ``diffexit.uem``): each adapter plugs one engine into
diffusers. ``ThresholdSchedule`` and ``progress`` live in ``diffexit.common.schedules`` and are re-exported here,
where users have always imported them. The diffusers swap-ins load on first access.
"""

from ..common.schedules import KINDS, ThresholdSchedule, progress

_LAZY = {
    "SchEDScheduler": ".sched_scheduler",
    "ExactCacheLLaDA2Pipeline": ".exact_cache_pipeline",
    "ExitAwareScheduler": ".exit_scheduler",
    "attach_early_exits": ".early_exits",
    "detach_early_exits": ".early_exits",
}

__all__ = ["KINDS", "ThresholdSchedule", "progress", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
