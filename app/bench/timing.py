"""Wall-clock that means something on a shared machine: rows timed interleaved and repeated, and a flag for the rows
whose wall-clock still disagrees with their cost.

A row timed once, while the machine happened to be busy, showed wall ratios 5x above its pass ratio. So every bench
times its rows round-robin, :data:`REPEATS` times or more, and reports each row's median and spread
(:func:`time_interleaved`); a slow spell then lands on one repeat of every row instead of on every repeat of one::

    timed = time_interleaved({"full": run_full, "sched": run_sched})
    full, sched = timed["full"], timed["sched"]
    speedup_wall = full.median / sched.median
    row.update(sched.figures(), noisy=is_noisy(speedup_wall, speedup_passes))

A row whose wall speedup lies outside :data:`NOISY_BAND` times its pass speedup (forward passes, blocks run: the
bench's cost ratio) is flagged noisy: its wall-clock is not to be read as what the method buys.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

REPEATS = 3
# A wall speedup within this factor of the pass speedup is believable; outside it, the clock measured the machine.
NOISY_BAND = (0.5, 1.5)


@dataclass(frozen=True)
class Timed:
    """One row's repeated timing.

    Attributes:
        seconds: each repeat's wall-clock, in seconds, in the order they ran.
        result: what the row's callable returned on its last repeat.
    """

    seconds: tuple[float, ...]
    result: Any = None

    @property
    def median(self) -> float:
        """The median of :attr:`seconds`, in seconds."""
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """The slowest repeat minus the fastest, in seconds."""
        return max(self.seconds) - min(self.seconds)

    def figures(self) -> dict:
        """The row figures every bench writes for a timing: ``seconds`` (the median), ``seconds_spread`` and
        ``repeats``."""
        return {"seconds": self.median, "seconds_spread": self.spread, "repeats": len(self.seconds)}


def time_interleaved(calls: Mapping[str, Callable[[], Any]], repeats: int = REPEATS) -> dict[str, Timed]:
    """Time every callable of ``calls`` (row name -> a call that does the row's whole work) ``repeats`` times,
    round-robin: each round runs every row once, odd rounds in reverse order, so no row always runs first or right
    after the same neighbour.

    Returns ``{name: Timed}`` in the order of ``calls``. The calls should be deterministic: only the last
    repeat's result is kept.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < REPEATS:
        raise ValueError(f"repeats must be an int >= {REPEATS} (a median of fewer says nothing about the spread), "
                         f"got {repeats!r}")
    if not calls:
        raise ValueError("time_interleaved needs at least one call to time")
    names = list(calls)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    results: dict[str, Any] = {}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            results[name] = calls[name]()
            seconds[name].append(time.perf_counter() - start)
    return {n: Timed(tuple(seconds[n]), results[n]) for n in names}


def is_noisy(speedup_wall: Optional[float], speedup_passes: Optional[float]) -> Optional[bool]:
    """Whether a row's wall speedup lies outside :data:`NOISY_BAND` times its pass speedup; None when either is
    missing (a row that was not timed, or has no cost ratio)."""
    if speedup_wall is None or speedup_passes is None:
        return None
    if speedup_passes <= 0:
        raise ValueError(f"a pass speedup is positive, got {speedup_passes}")
    low, high = NOISY_BAND
    return not low <= speedup_wall / speedup_passes <= high
