"""``ExitAwareScheduler``: any diffusers scheduler, plus the bookkeeping that early exits need.

    early_exit = enable_early_exit(pipe, uem, UncertaintyThreshold(ThresholdSchedule("linear", 0.3, 0.05)))
    pipe.scheduler = ExitAwareScheduler(pipe.scheduler, early_exit)
    images = pipe(class_labels, num_inference_steps=25).images
    stats = pipe.scheduler.statistics          # ExitStatistics
    stats.layer_ratio, stats.depth_counts      # cost, and a [steps, num_blocks] matrix for plots

It never changes a step: every call goes to the wrapped scheduler (DDIM, DPM-Solver, Euler, flow matching...), and
every other attribute reads through to it, so ``pipe.scheduler.config`` and the pipelines' signature checks on
``set_timesteps`` / ``step`` see the wrapped scheduler. What it adds:

- ``set_timesteps`` starts a new record and tells the model the progress of its first step;
- each ``step`` files the depths the model reported since the previous step under that step's timestep, then
  moves the progress on. Progress is ``diffexit.samplers.progress(i, len(timesteps))``, where ``i`` counts steps
  from the scheduler's ``begin_index`` (so img2img's partial runs sit at the tail of the schedule).

Saving: to diffusers it is the wrapped scheduler (``__class__`` and ``__module__`` are the wrapped one's, the way
``unittest.mock`` presents a spec), so ``pipe.save_pretrained(dir)`` writes the wrapped scheduler's config and
``from_pretrained`` gives it back, unwrapped; early exits are a runtime setting, so wrap it again after loading.
``isinstance(pipe.scheduler, ExitAwareScheduler)`` stays true.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..common.schedules import progress
from ..uem.early_exit import EarlyExit


@dataclass(frozen=True)
class ExitStatistics:
    """The depths of one pipeline call.

    Attributes:
        timesteps: the scheduler timestep of each step, float ``[S]``.
        depths: blocks run by each sample at each step, int64 ``[S, G]`` (a guided cond/uncond pair is one sample;
            when the model ran several times in one step, those calls' samples are concatenated).
        num_blocks: blocks available per call.
    """

    timesteps: torch.Tensor
    depths: torch.Tensor
    num_blocks: int

    @property
    def layer_ratio(self) -> float:
        """Blocks run over blocks available, in ``(0, 1]``."""
        if self.depths.numel() == 0:
            raise ValueError("no steps were recorded: run the pipeline with this scheduler first")
        return float(self.depths.sum()) / (self.num_blocks * self.depths.numel())

    @property
    def depth_counts(self) -> torch.Tensor:
        """``[S, num_blocks]`` int64: entry ``[s, d - 1]`` counts the samples that ran ``d >= 1`` blocks at step ``s``.

        A sample that ran no block at a step (depth 0: a cached remainder's skipped step, ``exit_every``) has no
        column, as the demo's heatmap shows exits; ``depths`` keeps it."""
        counts = torch.zeros(self.depths.shape[0], self.num_blocks + 1, dtype=torch.long)
        return counts.scatter_add_(1, self.depths, torch.ones_like(self.depths))[:, 1:]


def _with_signature_of(inner, impl):
    """``impl``, presented with ``inner``'s signature (pipelines inspect ``set_timesteps`` and ``step``)."""

    @functools.wraps(inner)
    def call(*args, **kwargs):
        return impl(*args, **kwargs)

    return call


class ExitAwareScheduler:
    """Wrap ``scheduler`` so that ``early_exit`` learns the sampling progress and its depths get recorded.

    Args:
        scheduler: any diffusers scheduler.
        early_exit: what ``diffexit.uem.enable_early_exit`` returned for the pipeline's transformer.
    """

    def __init__(self, scheduler, early_exit: EarlyExit):
        if isinstance(scheduler, ExitAwareScheduler):
            raise ValueError("this scheduler is already exit-aware; wrap its .scheduler instead")
        if not (callable(getattr(scheduler, "set_timesteps", None)) and callable(getattr(scheduler, "step", None))):
            raise ValueError(f"expected a diffusers scheduler (set_timesteps and step), got {type(scheduler).__name__}")
        if not isinstance(early_exit, EarlyExit):
            raise ValueError(
                f"early_exit must be the EarlyExit that enable_early_exit returned, got {type(early_exit).__name__}"
            )
        self.scheduler = scheduler
        self.__module__ = type(scheduler).__module__  # what diffusers records for the component when it saves
        self.early_exit = early_exit
        self._records: list[tuple[float, torch.Tensor]] = []
        self._pending: list[torch.Tensor] = []
        self._steps_done = 0
        early_exit.depth_listener = self._pending.append
        self.set_timesteps = _with_signature_of(scheduler.set_timesteps, self._set_timesteps)
        self.step = _with_signature_of(scheduler.step, self._step)
        if callable(getattr(scheduler, "set_begin_index", None)):
            self.set_begin_index = _with_signature_of(scheduler.set_begin_index, self._set_begin_index)

    @property
    def __class__(self):
        # Pipelines save and type-check their components by class: they see the wrapped scheduler.
        return type(self.__dict__["scheduler"])

    def __getattr__(self, name):
        inner = self.__dict__.get("scheduler")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def __repr__(self):
        return f"ExitAwareScheduler({type(self.scheduler).__name__}, {self.early_exit.rule!r})"

    def _publish_progress(self) -> None:
        total = len(self.scheduler.timesteps)
        begin = getattr(self.scheduler, "begin_index", None) or 0
        self.early_exit.progress = progress(min(begin + self._steps_done, total - 1), total)

    def _set_timesteps(self, *args, **kwargs):
        out = self.scheduler.set_timesteps(*args, **kwargs)
        self._records, self._pending, self._steps_done = [], [], 0
        self.early_exit.depth_listener = self._pending.append
        self._publish_progress()
        return out

    def _set_begin_index(self, *args, **kwargs):
        out = self.scheduler.set_begin_index(*args, **kwargs)
        self._publish_progress()
        return out

    def _step(self, *args, **kwargs):
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        if self._pending:
            self._records.append((float(timestep), torch.cat([d.cpu() for d in self._pending])))
            self._pending.clear()
        out = self.scheduler.step(*args, **kwargs)
        self._steps_done += 1
        self._publish_progress()
        return out

    @property
    def statistics(self) -> ExitStatistics:
        """The depths recorded since the last ``set_timesteps`` (that is, during the latest pipeline call)."""
        num_blocks = self.early_exit.num_blocks
        if not self._records:
            return ExitStatistics(torch.zeros(0), torch.zeros(0, 0, dtype=torch.long), num_blocks)
        widths = {len(d) for _, d in self._records}
        if len(widths) > 1:
            raise ValueError(f"the number of samples changed between steps ({sorted(widths)}); no matrix to build")
        timesteps = torch.tensor([t for t, _ in self._records], dtype=torch.float64)
        return ExitStatistics(timesteps, torch.stack([d for _, d in self._records]), num_blocks)
