"""Halting rules for masked-diffusion decoding: when to stop refining and fill every remaining mask at once.

A rule sees, at every step, the token statistics of the whole generation span and which positions are still
masked, and decides **per sample** whether that sample halts now. The decoding loop then fills every remaining
mask of a halted sample with the current argmax and drops the sample from the batch (no more forward passes).

Rules:

- :class:`SchED` -- the SchED paper's rule: aggregate the top-1 minus top-2 logit margin over every still-masked
  position of the span (``stat="mean"`` in the paper) and halt once it reaches a threshold that follows a
  :class:`~diffexit.samplers.ThresholdSchedule` of decoding progress. Beyond the paper, the statistic can be
  the minimum, a quantile, the mean without EOS/padding positions, or minus the largest entropy
  (:func:`span_statistic`; :mod:`diffexit.dllm.statistics` has the table of names):
  the full-span mean can be inflated by easy padding positions and halt too early.
- :class:`Prophet` -- the Prophet baseline, as its reference ``generate_earlyexit.py`` decides: the mean margin over a
  fixed answer window of ``window`` positions from ``answer_start`` (decoded ones included) against 7.5 / 5.0 / 2.5
  by the phase of decoding.

A rule learns the number of steps at :meth:`HaltingRule.start`, and each step sees the 0-based nominal step of every
sample (block x steps per block + step in block, so parallel commits that end a block early move it on too), from
which it takes its own progress: SchED's is :func:`diffexit.common.schedules.progress`, ``i / (T - 1)``.

``halting=None`` in the decoding loops means fixed steps: no rule, every step runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..common.schedules import ThresholdSchedule, progress
from .statistics import SPAN, check_stat, names

STATS = names(SPAN)


@dataclass
class HaltDecision:
    """One step's decision for the ``A`` samples still decoding.

    Attributes:
        halt: ``[A]`` bool, True where the sample halts now.
        value: ``[A]`` float32, the aggregated statistic the rule compared (logits, nats of margin).
        threshold: ``[A]`` float32, the threshold it was compared against.
    """

    halt: torch.Tensor
    value: torch.Tensor
    threshold: torch.Tensor


def aggregate_margin(margin: torch.Tensor, masked: torch.Tensor, stat: str, q: float = 0.1) -> torch.Tensor:
    """Aggregate per-position margins over the masked positions of each row.

    Args:
        margin: ``[A, L]`` float, top-1 minus top-2 logit per position.
        masked: ``[A, L]`` bool, positions that count.
        stat: ``mean``, ``median``, ``quantile`` or ``min``. ``median`` is the lower median (``torch.median``'s
            choice).
        q: the quantile for ``stat="quantile"``, in ``[0, 1]``.

    Returns:
        ``[A]`` float32. A row with no masked position gets ``+inf`` (nothing left to decide).
    """
    margin = margin.float()
    if stat == "mean":
        count = masked.sum(-1)
        total = torch.where(masked, margin, torch.zeros_like(margin)).sum(-1)
        out = total / count.clamp(min=1)
        return torch.where(count > 0, out, torch.full_like(out, float("inf")))
    if stat == "min":
        return torch.where(masked, margin, torch.full_like(margin, float("inf"))).amin(-1)
    # Order statistics: +inf for unmasked positions sorts them last, so the k-th smallest masked value is
    # at index k of the sorted row.
    filled = torch.where(masked, margin, torch.full_like(margin, float("inf")))
    ordered, _ = filled.sort(-1)
    count = masked.sum(-1)
    if stat == "median":
        idx = (count - 1).clamp(min=0) // 2
    elif stat == "quantile":
        idx = torch.floor(q * (count - 1).clamp(min=0).float()).long()
    else:
        raise ValueError(f"aggregate_margin takes stat mean, median, quantile or min, got {stat!r}")
    out = ordered.gather(-1, idx[:, None]).squeeze(-1)
    return torch.where(count > 0, out, torch.full_like(out, float("inf")))


def span_statistic(stats, masked: torch.Tensor, stat: str, q: float = 0.1,
                   ignore_token_ids: Sequence[int] = ()) -> torch.Tensor:
    """SchED's confidence statistic of each row's masked span: larger means more sure; ``[A]`` float32.

    ``stat`` is a name the span accepts in :data:`~diffexit.dllm.statistics.STATISTICS`:

    - ``mean | median | quantile | min``: that aggregate of the logit margins (:func:`aggregate_margin`).
    - ``mean_content``: the mean margin over masked positions whose argmax is not in ``ignore_token_ids``
      (EOS / padding), so that easy padding cannot inflate it; rows whose every masked position predicts
      padding fall back to the plain mean.
    - ``max_entropy``: minus the largest entropy (nats) among the masked positions; thresholds are then <= 0.
    """
    check_stat(stat, SPAN)
    if stat == "mean_content":
        content = masked & ~torch.isin(stats.top1_id, torch.as_tensor(list(ignore_token_ids), dtype=torch.long,
                                                                       device=masked.device))
        value = aggregate_margin(stats.logit_margin, content, "mean")
        return torch.where(content.any(-1), value, aggregate_margin(stats.logit_margin, masked, "mean"))
    if stat == "max_entropy":
        worst = torch.where(masked, stats.entropy.float(), torch.full_like(stats.entropy.float(), -float("inf")))
        return -worst.amax(-1)
    return aggregate_margin(stats.logit_margin, masked, stat, q)


class HaltingRule:
    """Base class. Subclasses implement :meth:`decide`; :meth:`start` resets per-sample state.

    ``self.total_steps`` holds the run's step count once :meth:`start` ran.
    """

    total_steps: int = 1

    def start(self, batch_size: int, span_length: int, device: torch.device, total_steps: int) -> None:
        """Called once per generation, before the first step; subclasses that keep state call ``super().start``."""
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        self.total_steps = total_steps

    def progress(self, step: torch.Tensor) -> torch.Tensor:
        """``step / (T - 1)`` of 0-based nominal steps ``[A]``: float32 in ``[0, 1]``."""
        return progress(step, self.total_steps)

    def threshold_per_step(self, total_steps: int) -> Optional[list[float]]:
        """The threshold at each of ``total_steps`` steps (for plots), or None where it is not a function of the step
        alone."""
        return None

    def decide(self, stats, masked: torch.Tensor, step: torch.Tensor, rows: torch.Tensor) -> HaltDecision:
        """Decide which of the ``A`` active samples halt.

        Args:
            stats: :class:`~diffexit.kernels.TokenStats` of the span logits, fields ``[A, L]``.
            masked: ``[A, L]`` bool, still-masked positions of the span.
            step: ``[A]`` long, each sample's 0-based nominal step out of ``self.total_steps``.
            rows: ``[A]`` long, each active sample's index in the original batch (for per-sample state).
        """
        raise NotImplementedError


class SchED(HaltingRule):
    """Progress-aware logit-margin halting (SchED).

    Args:
        schedule: the threshold as a function of progress. Paper defaults: ``high=7.5``, ``low=2.5``,
            kinds ``linear``, ``cosine`` or ``exp`` (``k=4``).
        stat: the span statistic (:func:`span_statistic`): ``mean`` (the paper), ``median``,
            ``quantile`` (the ``q``-th quantile), ``min``, ``mean_content`` (padding excluded) or ``max_entropy``
            (minus the worst position's entropy; give it a schedule of non-positive thresholds).
        q: quantile for ``stat="quantile"``.
        ignore_token_ids: the EOS / padding ids that ``mean_content`` leaves out (required for it).
        min_progress: never halt before this progress.
        patience: also require the argmax on the masked positions to have been stable for this many
            consecutive steps (0 disables the gate).
        max_change_ratio: with ``patience > 0``, a step counts as stable when at most this fraction of the
            masked positions changed argmax since the previous step (0.0: none may change).
    """

    def __init__(
        self,
        schedule: Optional[ThresholdSchedule] = None,
        stat: str = "mean",
        min_progress: float = 0.0,
        patience: int = 0,
        max_change_ratio: float = 0.0,
        q: float = 0.1,
        ignore_token_ids: Sequence[int] = (),
    ):
        if schedule is None:
            schedule = ThresholdSchedule("cosine", high=7.5, low=2.5)
        if not isinstance(schedule, ThresholdSchedule):
            raise ValueError(f"schedule must be a ThresholdSchedule, got {type(schedule).__name__}")
        check_stat(stat, SPAN)
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q}")
        if stat == "mean_content" and not ignore_token_ids:
            raise ValueError("stat='mean_content' needs ignore_token_ids (the EOS / padding token ids to leave out)")
        if not 0.0 <= min_progress <= 1.0:
            raise ValueError(f"min_progress must be in [0, 1], got {min_progress}")
        if not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be a non-negative int, got {patience!r}")
        if not 0.0 <= max_change_ratio <= 1.0:
            raise ValueError(f"max_change_ratio must be in [0, 1], got {max_change_ratio}")
        self.schedule, self.stat, self.q = schedule, stat, q
        self.ignore_token_ids = tuple(int(i) for i in ignore_token_ids)
        self.min_progress, self.patience, self.max_change_ratio = min_progress, patience, max_change_ratio
        self._prev_argmax: Optional[torch.Tensor] = None
        self._stable: Optional[torch.Tensor] = None

    def __repr__(self):
        return (
            f"SchED({self.schedule}, stat={self.stat!r}, min_progress={self.min_progress}, "
            f"patience={self.patience}, max_change_ratio={self.max_change_ratio})"
        )

    def to_dict(self) -> dict:
        """The rule's parameters as JSON-ready values; :meth:`from_dict` rebuilds it."""
        return {"schedule": self.schedule.to_dict(), "stat": self.stat, "q": self.q,
                "ignore_token_ids": list(self.ignore_token_ids), "min_progress": self.min_progress,
                "patience": self.patience, "max_change_ratio": self.max_change_ratio}

    @classmethod
    def from_dict(cls, d: dict) -> "SchED":
        unknown = set(d) - {"schedule", "stat", "q", "ignore_token_ids", "min_progress", "patience",
                            "max_change_ratio"}
        if unknown:
            raise ValueError(f"unknown SchED parameters {sorted(unknown)}")
        d = dict(d)
        return cls(ThresholdSchedule.from_dict(d.pop("schedule")), **d)

    def threshold_per_step(self, total_steps):
        return [self.schedule(progress(i, total_steps)) for i in range(total_steps)]

    def start(self, batch_size, span_length, device, total_steps):
        super().start(batch_size, span_length, device, total_steps)
        self._prev_argmax = torch.full((batch_size, span_length), -1, dtype=torch.long, device=device)
        self._stable = torch.zeros(batch_size, dtype=torch.long, device=device)

    def decide(self, stats, masked, step, rows):
        value = span_statistic(stats, masked, self.stat, self.q, self.ignore_token_ids)
        progress = self.progress(step.to(value.device))
        threshold = self.schedule.values(progress)
        halt = (value >= threshold) & (progress >= self.min_progress)
        if self.patience > 0:
            if self._stable is None:
                raise RuntimeError("SchED.start() must be called before decide()")
            # Masks only ever get filled, so every position masked now was masked at the previous step too.
            changed = ((stats.top1_id != self._prev_argmax[rows]) & masked).sum(-1).float()
            ratio = changed / masked.sum(-1).clamp(min=1).float()
            first = (self._prev_argmax[rows] < 0).all(-1)
            stable_now = (ratio <= self.max_change_ratio) & ~first
            self._stable[rows] = torch.where(stable_now, self._stable[rows] + 1, torch.zeros_like(self._stable[rows]))
            self._prev_argmax[rows] = stats.top1_id
            halt &= self._stable[rows] >= self.patience
        return HaltDecision(halt=halt, value=value, threshold=threshold)


class Prophet(HaltingRule):
    """Prophet: halt once the model is confident about the answer's first few tokens.

    The semantics of the reference (``generate_earlyexit.py`` of the Prophet repository): the statistic is the mean
    top-1 minus top-2 logit margin over the fixed window of ``window`` span positions starting at ``answer_start``
    (already-decoded positions included; the window is cut at the span's end). The threshold goes by the phase of
    decoding, ``(i + 1) / T`` for 0-based step ``i`` of ``T``: ``thresholds[0]`` below ``cutoffs[0]``,
    ``thresholds[1]`` below ``cutoffs[1]``, then ``thresholds[2]``. The defaults are the reference's. It is cheap,
    but blind to the rest of a long answer.

    Args:
        window: positions in the answer window.
        answer_start: where the window starts, as a position of the span (the reference's ``answer_start_pos``
            minus the prompt length); 0 is the span's start.
        thresholds: the early, middle and late thresholds, in logits of margin.
        cutoffs: where the middle and the late phases begin, in ``(i + 1) / T``.
    """

    def __init__(self, window: int = 5, answer_start: int = 0, thresholds: Sequence[float] = (7.5, 5.0, 2.5),
                 cutoffs: Sequence[float] = (0.33, 0.67)):
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            raise ValueError(f"window must be a positive int, got {window!r}")
        if isinstance(answer_start, bool) or not isinstance(answer_start, int) or answer_start < 0:
            raise ValueError(f"answer_start must be a span position >= 0, got {answer_start!r}")
        thresholds, cutoffs = tuple(float(t) for t in thresholds), tuple(float(c) for c in cutoffs)
        if len(thresholds) != 3 or not all(math.isfinite(t) for t in thresholds):
            raise ValueError(f"thresholds are (early, middle, late), three finite numbers; got {thresholds}")
        if len(cutoffs) != 2 or not 0 <= cutoffs[0] <= cutoffs[1] <= 1:
            raise ValueError(f"cutoffs are two phase boundaries 0 <= a <= b <= 1, got {cutoffs}")
        self.window, self.answer_start, self.thresholds, self.cutoffs = window, answer_start, thresholds, cutoffs

    def __repr__(self):
        return (f"Prophet(window={self.window}, answer_start={self.answer_start}, thresholds={self.thresholds}, "
                f"cutoffs={self.cutoffs})")

    def to_dict(self) -> dict:
        """The rule's parameters as JSON-ready values."""
        return {"window": self.window, "answer_start": self.answer_start, "thresholds": list(self.thresholds),
                "cutoffs": list(self.cutoffs)}

    def threshold_per_step(self, total_steps):
        return self.threshold_at(torch.arange(total_steps), total_steps).tolist()

    def threshold_at(self, step: torch.Tensor, total_steps: Optional[int] = None) -> torch.Tensor:
        """The threshold in force at 0-based steps ``[A]`` (of ``total_steps``, default the run's): float32."""
        phase = (step.float() + 1) / (total_steps or self.total_steps)
        early, middle, late = self.thresholds
        return torch.where(phase < self.cutoffs[0], early, torch.where(phase < self.cutoffs[1], middle, late))

    def start(self, batch_size, span_length, device, total_steps):
        super().start(batch_size, span_length, device, total_steps)
        if self.answer_start >= span_length:
            raise ValueError(f"Prophet's answer window starts at span position {self.answer_start}, beyond the span "
                             f"of {span_length}; give an answer_start inside the span")
        self._window = slice(self.answer_start, min(self.answer_start + self.window, span_length))

    def decide(self, stats, masked, step, rows):
        value = stats.logit_margin[:, self._window].float().mean(-1)
        threshold = self.threshold_at(step.to(value.device))
        return HaltDecision(halt=value >= threshold, value=value, threshold=threshold)
