"""Progress-aware threshold schedules, shared by SchED halting and DeeDiff exits.

A schedule maps sampling progress ``p`` in ``[0, 1]`` to a threshold. Both methods use a threshold that
moves from ``high`` (early, when little is decided) to ``low`` (late, when stopping costs little):

- ``constant``: ``high`` at every ``p`` (``low`` is ignored; pass the same value for clarity).
- ``linear``:   ``high + (low - high) * p``
- ``cosine``:   ``low + (high - low) * (1 + cos(pi * p)) / 2``
- ``exp``:      ``low + (high - low) * exp(-k * p)``
- ``step``:     Prophet-style thirds: ``high`` for ``p < 1/3``, the midpoint for ``p < 2/3``, then ``low``.

Progress for step ``i`` of ``T`` is ``i / (T - 1)``, and ``0`` when ``T == 1`` (see :func:`progress`). Users
write a schedule as ``KIND:HIGH:LOW[:K]`` (:meth:`ThresholdSchedule.parse`), e.g. ``cosine:7.5:2.5``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Union

KINDS = ("constant", "linear", "cosine", "exp", "step")
# Kinds whose value falls from `high` to `low`; for these `high < low` is almost always a swapped pair.
DECREASING_KINDS = ("linear", "cosine", "exp", "step")


def progress(step, total_steps: int):
    """Progress of 0-based ``step`` out of ``total_steps``: ``step / (total_steps - 1)``, and 0 when T == 1.

    ``step`` is an int (returns a float, checked to lie in ``[0, T - 1]``) or an integer tensor (returns float32
    progress of the same shape, on its device, clamped to 1: the decoding loops pass nominal steps).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not isinstance(step, int):
        return (step.float() / max(total_steps - 1, 1)).clamp(max=1.0)
    if not 0 <= step < total_steps:
        raise ValueError(f"step must be in [0, {total_steps - 1}], got {step}")
    return 0.0 if total_steps == 1 else step / (total_steps - 1)


@dataclass(frozen=True)
class ThresholdSchedule:
    """A threshold as a function of progress. ``schedule(p) -> float``; ``schedule.values(tensor)`` vectorised.

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

    def _formula(self, p, cos, exp, where):
        """The schedule at ``p``, written once for floats and tensors (``cos``, ``exp``, ``where`` of either)."""
        high, low = float(self.high), float(self.low)
        if self.kind == "linear":
            return high + (low - high) * p
        if self.kind == "cosine":
            return low + (high - low) * (1.0 + cos(math.pi * p)) / 2.0
        if self.kind == "exp":
            return low + (high - low) * exp(-self.k * p)
        # step: Prophet's thirds.
        return where(p < 1.0 / 3.0, high, where(p < 2.0 / 3.0, (high + low) / 2.0, low))

    def __call__(self, p: float) -> float:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"progress must be in [0, 1], got {p}")
        if self.kind == "constant":
            return float(self.high)
        return self._formula(p, math.cos, math.exp, lambda cond, a, b: a if cond else b)

    def values(self, p):
        """:meth:`__call__` for a tensor of progress values: float32, on ``p``'s device, no host sync."""
        import torch

        p = p.float()
        if self.kind == "constant":
            return torch.full_like(p, float(self.high))
        return self._formula(p, torch.cos, torch.exp, torch.where)

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

    @classmethod
    def parse(cls, text: str) -> "ThresholdSchedule":
        """``"KIND:HIGH:LOW[:K]"`` (e.g. ``"linear:0.3:0.05"``, ``"exp:7.5:2.5:4"``) as a schedule."""
        kind, *numbers = str(text).split(":")
        if len(numbers) not in (2, 3):
            raise ValueError(f"write a schedule as KIND:HIGH:LOW[:K], e.g. 'linear:0.3:0.05', got {text!r}")
        try:
            high, low, *k = (float(n) for n in numbers)
        except ValueError:
            raise ValueError(f"the numbers in {text!r} must be numbers, e.g. 'linear:0.3:0.05'") from None
        return cls(kind, high, low, k[0] if k else None)

    def describe(self) -> str:
        """``"cosine 7.5 -> 2.5"``, ``"exp 0.3 -> 0.05 (k=4)"``, ``"constant 0.1"``."""
        if self.kind == "constant":
            return f"constant {self.high:g}"
        rate = f" (k={self.k:g})" if self.kind == "exp" else ""
        return f"{self.kind} {self.high:g} -> {self.low:g}{rate}"


def parse_threshold(value: Union[str, float, int, dict]) -> Union[float, ThresholdSchedule]:
    """A threshold as users give it: a number, ``"KIND:HIGH:LOW[:K]"``, or a :meth:`ThresholdSchedule.to_dict`
    dict. Numbers (also in strings) stay floats; raises ``ValueError`` naming the accepted forms."""
    if isinstance(value, dict):
        return ThresholdSchedule.from_dict(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return ThresholdSchedule.parse(value)
    raise ValueError(f"a threshold must be a number, KIND:HIGH:LOW[:K] or a schedule object, got {value!r}")


def threshold_to_json(threshold: Union[float, ThresholdSchedule]) -> Union[float, dict]:
    """The JSON form of :func:`parse_threshold`'s result (it parses back to the same value)."""
    return threshold.to_dict() if isinstance(threshold, ThresholdSchedule) else float(threshold)
