"""Halting rules for masked-diffusion decoding: when to stop refining and fill every remaining mask at once.

A rule sees, at every step, the token statistics of the whole generation span and which positions are still
masked, and decides **per sample** whether that sample halts now. The decoding loop then fills every remaining
mask of a halted sample with the current argmax and drops the sample from the batch (no more forward passes).

Rules:

- :class:`SchED` -- the SchED paper's rule: aggregate the top-1 minus top-2 logit margin over every still-masked
  position of the span (``stat="mean"`` in the paper) and halt once it reaches a threshold that follows a
  :class:`~diffexit.samplers.ThresholdSchedule` of decoding progress. Beyond the paper, the statistic can be
  the minimum, a quantile, the mean without EOS/padding positions, or an entropy (:func:`span_statistic`):
  the full-span mean can be inflated by easy padding positions and halt too early.
- :class:`Prophet` -- the Prophet baseline: the mean margin over a small answer window (the ``window`` earliest
  still-masked positions) against thresholds 7.5 / 5.0 / 2.5 by thirds of progress.

``halting=None`` in the decoding loops means fixed steps: no rule, every step runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..samplers.schedules import ThresholdSchedule

STATS = ("mean", "median", "quantile", "min", "mean_content", "entropy")
MARGIN_STATS = ("mean", "median", "quantile", "min")


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
        stat: one of ``MARGIN_STATS``. ``median`` is the lower median (``torch.median``'s choice).
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
        raise ValueError(f"stat must be one of {MARGIN_STATS}, got {stat!r}")
    out = ordered.gather(-1, idx[:, None]).squeeze(-1)
    return torch.where(count > 0, out, torch.full_like(out, float("inf")))


def span_statistic(stats, masked: torch.Tensor, stat: str, q: float = 0.1,
                   ignore_token_ids: Sequence[int] = ()) -> torch.Tensor:
    """SchED's confidence statistic of each row's masked span: larger means more sure; ``[A]`` float32.

    - ``mean | median | quantile | min``: that aggregate of the logit margins (:func:`aggregate_margin`).
    - ``mean_content``: the mean margin over masked positions whose argmax is not in ``ignore_token_ids``
      (EOS / padding), so that easy padding cannot inflate it; rows whose every masked position predicts
      padding fall back to the plain mean.
    - ``entropy``: minus the largest entropy (nats) among the masked positions; thresholds are then <= 0.
    """
    if stat in MARGIN_STATS:
        return aggregate_margin(stats.logit_margin, masked, stat, q)
    if stat == "mean_content":
        content = masked & ~torch.isin(stats.top1_id, torch.as_tensor(list(ignore_token_ids), dtype=torch.long,
                                                                       device=masked.device))
        value = aggregate_margin(stats.logit_margin, content, "mean")
        return torch.where(content.any(-1), value, aggregate_margin(stats.logit_margin, masked, "mean"))
    if stat == "entropy":
        worst = torch.where(masked, stats.entropy.float(), torch.full_like(stats.entropy.float(), -float("inf")))
        return -worst.amax(-1)
    raise ValueError(f"stat must be one of {STATS}, got {stat!r}")


class HaltingRule:
    """Base class. Subclasses implement :meth:`decide`; :meth:`start` resets per-sample state."""

    def start(self, batch_size: int, span_length: int, device: torch.device) -> None:
        """Called once per generation, before the first step."""

    def decide(self, stats, masked: torch.Tensor, progress: torch.Tensor, rows: torch.Tensor) -> HaltDecision:
        """Decide which of the ``A`` active samples halt.

        Args:
            stats: :class:`~diffexit.kernels.TokenStats` of the span logits, fields ``[A, L]``.
            masked: ``[A, L]`` bool, still-masked positions of the span.
            progress: ``[A]`` float, decoding progress of each sample in ``[0, 1]``.
            rows: ``[A]`` long, each active sample's index in the original batch (for per-sample state).
        """
        raise NotImplementedError


class SchED(HaltingRule):
    """Progress-aware logit-margin halting (SchED).

    Args:
        schedule: the threshold as a function of progress. Paper defaults: ``high=7.5``, ``low=2.5``,
            kinds ``linear``, ``cosine`` or ``exp`` (``k=4``).
        stat: the span statistic (:func:`span_statistic`): ``mean`` (the paper), ``median``,
            ``quantile`` (the ``q``-th quantile), ``min``, ``mean_content`` (padding excluded) or ``entropy``
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
        if stat not in STATS:
            raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
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

    def start(self, batch_size, span_length, device):
        self._prev_argmax = torch.full((batch_size, span_length), -1, dtype=torch.long, device=device)
        self._stable = torch.zeros(batch_size, dtype=torch.long, device=device)

    def decide(self, stats, masked, progress, rows):
        value = span_statistic(stats, masked, self.stat, self.q, self.ignore_token_ids)
        progress = progress.to(value.device)
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
    """Prophet: halt once the model is confident about the next few answer tokens.

    The statistic is the mean logit margin over the ``window`` earliest still-masked positions of the span
    (the decoding frontier). The threshold is ``schedule`` of progress; the default is Prophet's
    7.5 / 5.0 / 2.5 by thirds. It is cheap, but blind to the rest of a long answer.
    """

    def __init__(self, window: int = 5, schedule: Optional[ThresholdSchedule] = None):
        if not isinstance(window, int) or window <= 0:
            raise ValueError(f"window must be a positive int, got {window!r}")
        self.window = window
        self.schedule = schedule or ThresholdSchedule("step", high=7.5, low=2.5)

    def __repr__(self):
        return f"Prophet(window={self.window}, schedule={self.schedule})"

    def decide(self, stats, masked, progress, rows):
        # Rank of each masked position among the masked positions of its row, left to right.
        rank = masked.long().cumsum(-1)
        in_window = masked & (rank <= self.window)
        value = aggregate_margin(stats.logit_margin, in_window, "mean")
        threshold = self.schedule.values(progress.to(value.device))
        return HaltDecision(halt=value >= threshold, value=value, threshold=threshold)
