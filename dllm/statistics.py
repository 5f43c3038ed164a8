"""The halting statistics, in one table: what each reads, where it is accepted, its threshold range and its help.

A halting rule compares one number per sample, "larger means more sure", with a threshold. Each statistic is read on
one or more surfaces:

- ``span``: the still-masked positions of the text loops' generation span (:class:`~diffexit.dllm.halting.SchED` in
  ``generate`` and ``dream_generate``, calibration, ``diffexit generate text``, the demo, the bench);
- ``block``: the still-masked positions of a ``LLaDA2Pipeline`` block (``SchEDScheduler``);
- ``canvas``: every position of a DiffusionGemma canvas, where no position is "masked" (``SchEDStopping``).

Margins (top-1 minus top-2 logit) are never negative, so their thresholds are ``>= 0``; entropies (nats) are compared
negated so that larger still means more sure, so their thresholds are ``<= 0``. Every surface checks a name with
:func:`check_stat`, so a bad name gets the same message everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SPAN, BLOCK, CANVAS = "span", "block", "canvas"
SURFACES = {
    SPAN: "the masked span of the text loops (SchED)",
    BLOCK: "a LLaDA2Pipeline block (SchEDScheduler)",
    CANVAS: "a DiffusionGemma canvas (SchEDStopping)",
}
MARGIN, ENTROPY = "margin", "entropy"


@dataclass(frozen=True)
class Statistic:
    """One halting statistic.

    Attributes:
        name: what users write (``stat=``, ``--stat``, the demo's dropdown).
        reads: ``"margin"`` (top-1 minus top-2 logit per position) or ``"entropy"`` (nats per position).
        surfaces: where it is accepted (keys of :data:`SURFACES`).
        scanned: whether ``diffexit calibrate sched`` scans it (its family scales positive margin thresholds).
        help: one line saying what the per-position values are aggregated into.
    """

    name: str
    reads: str
    surfaces: tuple[str, ...]
    scanned: bool
    help: str

    @property
    def sign(self) -> int:
        """+1 where thresholds are ``>= 0`` (margins), -1 where they are ``<= 0`` (minus an entropy)."""
        return 1 if self.reads == MARGIN else -1

    @property
    def bounds(self) -> tuple[float, float]:
        """The range the statistic, and so any useful threshold, lives in."""
        return (0.0, math.inf) if self.sign > 0 else (-math.inf, 0.0)


_ALL = (SPAN, BLOCK, CANVAS)
STATISTICS: dict[str, Statistic] = {s.name: s for s in (
    Statistic("mean", MARGIN, _ALL, True, "the mean margin (the SchED paper's)"),
    Statistic("median", MARGIN, _ALL, True, "the lower median margin"),
    Statistic("quantile", MARGIN, _ALL, True, "the q-th quantile of the margins (q = 0.1 unless given)"),
    Statistic("min", MARGIN, _ALL, True, "the smallest margin"),
    Statistic("mean_content", MARGIN, (SPAN,), True,
              "the mean margin over positions whose argmax is not EOS / padding"),
    Statistic("max_entropy", ENTROPY, (SPAN,), False, "minus the largest entropy, in nats"),
    Statistic("mean_entropy", ENTROPY, (CANVAS,), False,
              "minus the mean entropy, in nats: the stock DiffusionGemma rule's statistic"),
)}
# Old names, refused with their new one: ``entropy`` was the text loops' worst-position entropy.
RENAMED = {"entropy": "max_entropy"}


def names(surface: str) -> tuple[str, ...]:
    """The statistics ``surface`` accepts, in table order."""
    return tuple(s.name for s in STATISTICS.values() if surface in s.surfaces)


def scanned_names() -> tuple[str, ...]:
    """The statistics that calibration scans, in table order."""
    return tuple(s.name for s in STATISTICS.values() if s.scanned)


def _where(stat: Statistic) -> str:
    where = [SURFACES[s] for s in stat.surfaces]
    return where[0] if len(where) == 1 else f"{', '.join(where[:-1])} and {where[-1]}"


def _by_where() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for stat in STATISTICS.values():
        out.setdefault(_where(stat), []).append(stat.name)
    return out


def check_stat(name, surface: str) -> Statistic:
    """The table entry of ``name`` if ``surface`` accepts it; else ``ValueError`` saying what to write instead.

    A name that is unknown or renamed gets the same message on every surface.
    """
    if surface not in SURFACES:
        raise ValueError(f"unknown surface {surface!r}; the surfaces are {list(SURFACES)}")
    if isinstance(name, str) and name in RENAMED:
        new = STATISTICS[RENAMED[name]]
        raise ValueError(f"stat {name!r} is now {new.name!r}: {new.help}, over {_where(new)}; use {new.name!r}")
    stat = STATISTICS.get(name) if isinstance(name, str) else None
    if stat is None:
        listed = "; ".join(f"{', '.join(group)} (over {where})" for where, group in _by_where().items())
        raise ValueError(f"stat must be one of {listed}; got {name!r}")
    if surface not in stat.surfaces:
        raise ValueError(f"stat {name!r} is read over {_where(stat)}, not {SURFACES[surface]}; there choose one of "
                         f"{list(names(surface))}")
    return stat


def check_scanned(name) -> Statistic:
    """:func:`check_stat` on the span, and the statistic must be one that calibration scans."""
    stat = check_stat(name, SPAN)
    if not stat.scanned:
        raise ValueError(f"stat {name!r} is not scanned by calibration (it scales positive margin thresholds); "
                         f"calibrate one of {list(scanned_names())}")
    return stat


def describe(surface: str, only_scanned: bool = False) -> str:
    """One line of help for the statistics ``surface`` accepts: ``"mean: the mean margin ...; min: ..."``, with the
    threshold sign."""
    stats = [STATISTICS[n] for n in names(surface) if STATISTICS[n].scanned or not only_scanned]
    parts = "; ".join(f"{s.name}: {s.help}" for s in stats)
    kinds = {s.reads for s in stats}
    sign = "thresholds >= 0" if kinds == {MARGIN} else "margins take thresholds >= 0, entropies <= 0"
    return f"{parts} ({sign})"
