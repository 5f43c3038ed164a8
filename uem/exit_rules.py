"""Exit rules: after each block, which samples stop.

The early-exit forward (:mod:`diffexit.uem.early_exit`) runs the blocks and asks its rule, after block ``depth``
(1-based), ``rule.exits(depth, progress, uncertainty)``:

- ``progress`` is the sampling progress in ``[0, 1]`` (``diffexit.samplers.progress``), or ``None`` when nothing
  has set it (see ``diffexit.samplers.ExitAwareScheduler``);
- ``uncertainty()`` computes, on demand, each sample's statistic at this block, ``[G]``, so a rule that does not
  look at it costs nothing. Which statistic is the rule's ``statistic``: ``"uncertainty"``, the mean-over-tokens
  UEM output, or ``"change"``, the relative change ``||h_k - h_{k-1}|| / ||h_{k-1}||`` that block ``k`` made to the
  sample's hidden state (norms over all its tokens and channels), which needs no trained heads (MuE's similarity
  exit). A guided pair reads the larger of its two rows' values.

The answer is a bool tensor ``[G]`` (True: that sample stops here) or one bool for every sample. After the last
block every sample stops, so rules are never asked there. A new rule subclasses :class:`ExitRule`.

Before the blocks run, ``rule.first_exit(progress, num_blocks)`` says the shallowest depth at which the rule could
stop a sample at this step; the forward does not ask before it, and at ``num_blocks`` (nothing can exit: a zero
threshold, a minimum depth of every block) it runs the model's own forward, so a step at full depth costs what it
costs without early exits.

Rules that vary over sampling (``StaticDepth``, a per-step ``MinDepth``, ``CalibratedThreshold``) hold one entry
per stretch: progress is cut into ``n`` equal stretches and stretch ``min(floor(progress * n), n - 1)`` applies.
With ``n`` sampling steps, step ``i`` (progress ``i / (n - 1)``) falls exactly in stretch ``i``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

from ..common.schedules import ThresholdSchedule

Uncertainty = Callable[[], torch.Tensor]


def _stretch(progress: float, n: int) -> int:
    """Index of the stretch of sampling that ``progress`` falls in, out of ``n`` equal ones."""
    return min(int(progress * n), n - 1)


def _in_force(values: tuple, progress: Optional[float], who: str):
    """The entry of ``values`` (one per stretch of sampling) in force at ``progress``; ``who`` names the rule in
    the error when a per-stretch rule gets no progress."""
    if len(values) == 1:
        return values[0]
    if progress is None:
        raise _needs_progress(who)
    return values[_stretch(progress, len(values))]


def _check_depths(depths, what: str) -> tuple[int, ...]:
    """``depths`` (an int or a sequence of ints >= 1) as a tuple; ``what`` names them in errors."""
    if isinstance(depths, int) and not isinstance(depths, bool):
        depths = (depths,)
    elif isinstance(depths, (list, tuple)):
        depths = tuple(depths)
    else:
        raise ValueError(f"{what} must be an int >= 1 or a list of them, got {depths!r}")
    if not depths:
        raise ValueError(f"{what}: give at least one")
    for d in depths:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"{what} must be ints >= 1, got {d!r} in {depths}")
    return depths


def _needs_progress(who: str) -> ValueError:
    return ValueError(
        f"{who} depends on the sampling progress, but none is set: swap in the exit-aware scheduler "
        f"(pipe.scheduler = ExitAwareScheduler(pipe.scheduler, early_exit)), or set early_exit.progress "
        f"to a value in [0, 1] before calling the model"
    )


STATISTICS = ("uncertainty", "change")


class ExitRule:
    """Base class. ``needs_uem`` says whether the rule reads the UEMs (if not, none need be loaded); ``statistic``
    which statistic its ``uncertainty()`` argument computes (see the module docstring)."""

    needs_uem: bool = True
    statistic: str = "uncertainty"

    def check(self, num_blocks: int) -> None:
        """Raise ``ValueError`` if this rule cannot apply to a model with ``num_blocks`` blocks."""

    def exits(self, depth: int, progress: Optional[float], uncertainty: Uncertainty) -> Union[torch.Tensor, bool]:
        raise NotImplementedError

    def first_exit(self, progress: Optional[float], num_blocks: int) -> int:
        """The shallowest depth (1-based) at which this rule could stop a sample at ``progress``; ``num_blocks``
        when none can stop before the last block."""
        return 1


class UncertaintyThreshold(ExitRule):
    """DeeDiff's rule: a sample stops after the first block whose mean uncertainty is below the threshold.

    Args:
        threshold: a constant in ``[0, 1]``, or a :class:`~diffexit.samplers.ThresholdSchedule` over sampling
            progress whose ``high`` and ``low`` lie in ``[0, 1]`` (noisy early steps tolerate a higher threshold,
            i.e. earlier exits). The comparison is strict, so ``0`` never fires.
    """

    _out_of_range = "uncertainty lies in [0, 1], so the threshold{} must too, got {}"

    def __init__(self, threshold: Union[float, ThresholdSchedule]):
        if isinstance(threshold, ThresholdSchedule):
            for name in ("high", "low"):
                value = getattr(threshold, name)
                if not 0.0 <= value <= 1.0:
                    raise ValueError(self._out_of_range.format(f" schedule's {name}", value))
        elif isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
            if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
                raise ValueError(self._out_of_range.format("", threshold))
            threshold = float(threshold)
        else:
            raise ValueError(
                f"threshold must be a float in [0, 1] or a ThresholdSchedule, got {type(threshold).__name__}"
            )
        self.threshold = threshold

    def threshold_at(self, progress: Optional[float]) -> float:
        """The threshold in force at ``progress``."""
        if isinstance(self.threshold, float):
            return self.threshold
        if self.threshold.kind == "constant":
            return float(self.threshold.high)
        if progress is None:
            raise _needs_progress(f"the threshold schedule {self.threshold}")
        return self.threshold(progress)

    def exits(self, depth, progress, uncertainty):
        return uncertainty() < self.threshold_at(progress)

    def first_exit(self, progress, num_blocks):
        return num_blocks if self.threshold_at(progress) <= 0.0 else 1

    def __repr__(self):
        return f"UncertaintyThreshold({self.threshold!r})"


class SimilarityExit(UncertaintyThreshold):
    """MuE's training-free exit: a sample stops after the first block that changed its hidden state by less than
    ``tolerance`` relative to it (``||h_k - h_{k-1}|| / ||h_{k-1}||``); any transformer, no heads.

    Args:
        tolerance: a constant in ``[0, 1]``, or a ``ThresholdSchedule`` over sampling progress; ``0`` never fires.
    """

    needs_uem = False
    statistic = "change"
    _out_of_range = "the tolerance{} must lie in [0, 1] (a share of the hidden state's norm), got {}"

    def __repr__(self):
        return f"SimilarityExit({self.threshold!r})"


class StaticDepth(ExitRule):
    """A fixed depth per stretch of sampling (the ASE-style baseline); no UEM involved.

    Args:
        depths: blocks to run, each in ``[1, num_blocks]``. Sampling progress is cut into ``len(depths)`` equal
            stretches, and stretch ``i`` (progress in ``[i/n, (i+1)/n)``, the last one closed) runs ``depths[i]``
            blocks. One entry is a fixed depth at every step. ``(4, 8, 12)`` runs 4 blocks on the noisiest third.
    """

    needs_uem = False

    def __init__(self, depths: Sequence[int]):
        if isinstance(depths, int):
            raise ValueError(f"StaticDepth takes a sequence of depths, e.g. [{depths}], got the int {depths!r}")
        self.depths = _check_depths(depths, "StaticDepth depths")

    def check(self, num_blocks):
        if max(self.depths) > num_blocks:
            raise ValueError(
                f"the depth schedule {self.depths} asks for {max(self.depths)} blocks, but the model has only "
                f"{num_blocks}; cap the depths at {num_blocks}"
            )

    def depth_at(self, progress: Optional[float]) -> int:
        """The depth in force at ``progress``."""
        return _in_force(self.depths, progress, f"StaticDepth{self.depths}")

    def exits(self, depth, progress, uncertainty):
        return depth >= self.depth_at(progress)

    def first_exit(self, progress, num_blocks):
        return min(self.depth_at(progress), num_blocks)

    def __repr__(self):
        return f"StaticDepth({self.depths})"


class MinDepth(ExitRule):
    """No sample stops before a minimum depth; from there on, ``rule`` decides.

    Args:
        rule: the rule to defer to (an ``UncertaintyThreshold``, say).
        depth: the minimum number of blocks, each in ``[1, num_blocks]``: one int for every step, or a sequence of
            one per stretch of sampling (see the module docstring), e.g. a deeper minimum on the clean last steps.
    """

    def __init__(self, rule: ExitRule, depth: Union[int, Sequence[int]]):
        if not isinstance(rule, ExitRule):
            raise ValueError(f"MinDepth wraps an ExitRule, got {type(rule).__name__}")
        self.rule = rule
        self.depths = _check_depths(depth, "minimum depths")
        self.needs_uem = rule.needs_uem
        self.statistic = rule.statistic

    def check(self, num_blocks):
        if max(self.depths) > num_blocks:
            raise ValueError(f"minimum depth {max(self.depths)} exceeds the model's {num_blocks} blocks")
        self.rule.check(num_blocks)

    def depth_at(self, progress: Optional[float]) -> int:
        """The minimum depth in force at ``progress``."""
        return _in_force(self.depths, progress, f"the per-step minimum depth {self.depths}")

    def exits(self, depth, progress, uncertainty):
        if depth < self.depth_at(progress):
            return False
        return self.rule.exits(depth, progress, uncertainty)

    def first_exit(self, progress, num_blocks):
        return min(max(self.depth_at(progress), self.rule.first_exit(progress, num_blocks)), num_blocks)

    def __repr__(self):
        return f"MinDepth({self.rule!r}, {self.depths[0] if len(self.depths) == 1 else self.depths})"


class CalibratedThreshold(ExitRule):
    """Per-step uncertainty thresholds and minimum depths chosen by ``diffexit calibrate uem``.

    At step ``i`` (stretch ``i`` of sampling, see the module docstring) a sample stops after the first block
    ``k >= min_depths[i]`` whose mean uncertainty is below ``thresholds[i]``. A calibration file gives one:
    ``Calibration.load(path).checked_rule(transformer, uem, ...)`` (:mod:`diffexit.uem.calibration_file`), which
    refuses a calibration made for another model, other UEMs or another sampling setup.

    Args:
        thresholds: one threshold in ``[0, 1]`` per step (``0`` never fires: that step runs at full depth).
        min_depths: one minimum depth ``>= 1`` per step; ``None`` means no minimum.
        budget: the exit-error budget the thresholds were calibrated for (shown in ``repr``), or ``None``.
        statistic: what the thresholds bound: ``"uncertainty"`` (the UEMs') or ``"change"`` (the similarity exit's
            relative change, no heads).
    """

    def __init__(self, thresholds: Sequence[float], min_depths: Optional[Sequence[int]] = None,
                 budget: Optional[float] = None, statistic: str = "uncertainty"):
        if statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {statistic!r}; choose one of {list(STATISTICS)}")
        self.statistic = statistic
        self.needs_uem = statistic == "uncertainty"
        if isinstance(thresholds, (int, float, ThresholdSchedule)):
            raise ValueError(f"CalibratedThreshold takes one threshold per step; for one threshold at every step use "
                             f"UncertaintyThreshold({thresholds!r})")
        thresholds = tuple(float(t) for t in thresholds)
        if not thresholds:
            raise ValueError("CalibratedThreshold needs one threshold per step, got none")
        bad = [t for t in thresholds if not (math.isfinite(t) and 0.0 <= t <= 1.0)]
        if bad:
            raise ValueError(f"every threshold must lie in [0, 1] (the {statistic} statistic's range), got {bad[0]}")
        min_depths = (1,) * len(thresholds) if min_depths is None else _check_depths(min_depths, "minimum depths")
        if len(min_depths) != len(thresholds):
            raise ValueError(f"got {len(thresholds)} thresholds but {len(min_depths)} minimum depths; give one of "
                             f"each per step")
        self.thresholds = thresholds
        self.min_depths = min_depths
        self.budget = budget

    def check(self, num_blocks):
        if max(self.min_depths) > num_blocks:
            raise ValueError(f"minimum depth {max(self.min_depths)} exceeds the model's {num_blocks} blocks")

    def _in_force(self, progress):
        return _in_force(tuple(zip(self.thresholds, self.min_depths)), progress, f"{self!r}")

    def exits(self, depth, progress, uncertainty):
        threshold, min_depth = self._in_force(progress)
        if depth < min_depth:
            return False
        return uncertainty() < threshold

    def first_exit(self, progress, num_blocks):
        threshold, min_depth = self._in_force(progress)
        return num_blocks if threshold <= 0.0 else min(min_depth, num_blocks)

    def __repr__(self):
        budget = "" if self.budget is None else f"budget={self.budget:g}, "
        statistic = "" if self.statistic == "uncertainty" else f"{self.statistic}, "
        return f"CalibratedThreshold({statistic}{budget}{len(self.thresholds)} steps)"


class FullDepth(ExitRule):
    """Every sample runs every block: the reference, with the same bookkeeping as the other rules."""

    needs_uem = False

    def exits(self, depth, progress, uncertainty):
        return False

    def first_exit(self, progress, num_blocks):
        return num_blocks

    def __repr__(self):
        return "FullDepth()"
