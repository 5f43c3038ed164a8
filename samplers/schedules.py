"""Progress-aware threshold schedules, shared by SchED halting and DeeDiff exits.

A schedule maps sampling progress ``p`` in ``[0, 1]`` to a threshold. Both methods use a threshold that
moves from ``high`` (early, when little is decided) to ``low`` (late, when stopping costs little):

- ``constant``: ``high`` at every ``p`` (``low`` is ignored; pass the same value for clarity).
- ``linear``:   ``high + (low - high) * p``
- ``cosine``:   ``low + (high - low) * (1 + cos(pi * p)) / 2``
- ``exp``:      ``low + (high - low) * exp(-k * p)``
- ``step``:     Prophet-style thirds: ``high`` for ``p < 1/3``, the midpoint for ``p < 2/3``, then ``low``.

Progress for step ``i`` of ``T`` is ``i / (T - 1)``, and ``0`` when ``T == 1`` (see :func:`progress`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

KINDS = ("constant", "linear", "cosine", "exp", "step")
# Kinds whose value falls from `high` to `low`; for these `high < low` is almost always a swapped pair.
DECREASING_KINDS = ("linear", "cosine", "exp", "step")


def progress(step: int, total_steps: int) -> float:
    """Progress of 0-based ``step`` out of ``total_steps``: ``step / (total_steps - 1)``, and 0 when T == 1."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= step < total_steps:
        raise ValueError(f"step must be in [0, {total_steps - 1}], got {step}")
    return 0.0 if total_steps == 1 else step / (total_steps - 1)


@dataclass(frozen=True)
class ThresholdSchedule:
    """A threshold as a function of progress. ``schedule(p) -> float``.

    Args:
        kind: one of ``constant | linear | cosine | exp | step``.
        high: the threshold at ``p = 0``.
        low: the threshold the schedule falls to at ``p = 1`` (for ``exp``, the asymptote).
        k: decay rate of ``exp`` (required there, and only there).
    """

    kind: str
    high: float
    low: float
    k: Optional[float] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"ThresholdSchedule kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("high", "low"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"ThresholdSchedule {name} must be a finite number, got {value!r}")
        if self.kind in DECREASING_KINDS and self.high < self.low:
            raise ValueError(
                f"ThresholdSchedule({self.kind!r}) falls from high to low, but high={self.high} < low={self.low}; "
                f"swap them (high is the threshold at progress 0)"
            )
        if self.kind == "exp":
            if self.k is None or not math.isfinite(self.k) or self.k <= 0:
                raise ValueError(f"ThresholdSchedule('exp') needs a decay rate k > 0, got k={self.k!r}")
        elif self.k is not None:
            raise ValueError(f"k only applies to kind='exp', got k={self.k!r} with kind={self.kind!r}")

    def __call__(self, p: float) -> float:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"progress must be in [0, 1], got {p}")
        high, low = float(self.high), float(self.low)
        if self.kind == "constant":
            return high
        if self.kind == "linear":
            return high + (low - high) * p
        if self.kind == "cosine":
            return low + (high - low) * (1.0 + math.cos(math.pi * p)) / 2.0
        if self.kind == "exp":
            return low + (high - low) * math.exp(-self.k * p)
        # step: Prophet's thirds.
        if p < 1.0 / 3.0:
            return high
        if p < 2.0 / 3.0:
            return (high + low) / 2.0
        return low

    def values(self, p):
        """Vectorised :meth:`__call__` for a tensor of progress values: float32, on ``p``'s device, no host sync."""
        import torch

        p = p.float()
        high, low = float(self.high), float(self.low)
        if self.kind == "constant":
            return torch.full_like(p, high)
        if self.kind == "linear":
            return high + (low - high) * p
        if self.kind == "cosine":
            return low + (high - low) * (1.0 + torch.cos(math.pi * p)) / 2.0
        if self.kind == "exp":
            return low + (high - low) * torch.exp(-self.k * p)
        mid = (high + low) / 2.0
        return torch.where(p < 1.0 / 3.0, high, torch.where(p < 2.0 / 3.0, mid, low))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ThresholdSchedule":
        unknown = set(d) - {"kind", "high", "low", "k"}
        if unknown:
            raise ValueError(f"unknown ThresholdSchedule fields {sorted(unknown)}; expected kind, high, low, k")
        missing = {"kind", "high", "low"} - set(d)
        if missing:
            raise ValueError(f"ThresholdSchedule is missing {sorted(missing)}")
        return cls(**d)
