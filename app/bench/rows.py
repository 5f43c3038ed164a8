"""The one row shape every bench writes (text, gemma, images), so a plot or a history line reads any bench the same
way.

A bench describes each configuration it runs by a :class:`RowId` and turns it, with the figures it measured, into
the ``results.json`` row with :func:`bench_row`::

    row = RowId("sched-cosine-low2.5", family="sched", params={"stat": "mean"})
    bench_row(row, task="pick", nfe=3.5, speedup_nfe=4.6)
    # {"method": "sched-cosine-low2.5", "family": "sched", "params": {"stat": "mean"}, "task": "pick", ...}

``method`` is the row's own name, ``family`` what groups rows (one colour in a plot, one line of a legend), and
``params`` the JSON-ready settings that tell rows of one family apart. A reader never parses a method's name to
find its family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The keys every bench row carries, whatever the bench.
COMMON_KEYS = ("method", "family", "params")


@dataclass(frozen=True)
class RowId:
    """What a bench row is, apart from what it measured.

    Attributes:
        name: the row's ``method`` in results.json, unique within a bench run's task.
        family: the group the row belongs to in plots and legends (e.g. ``"sched"`` for the whole SchED grid).
        params: JSON-ready settings of the row (copied into each row dict, so one row's dict cannot change another).
    """

    name: str
    family: str
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        for key in ("name", "family"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise ValueError(f"a bench row's {key} must be a non-empty string, got {value!r}")
        if not isinstance(self.params, dict):
            raise ValueError(f"a bench row's params must be a dict of JSON-ready settings, got "
                             f"{type(self.params).__name__}")


def bench_row(row: RowId, **figures: Any) -> dict:
    """The results.json row of ``row``: ``method``, ``family`` and a copy of ``params``, then ``figures`` in the
    order given (``task``, scores, NFE, seconds, ...; whatever the bench measures).

    A figure named like a common key is refused: it would overwrite the row's identity.
    """
    clash = [k for k in figures if k in COMMON_KEYS]
    if clash:
        raise ValueError(f"figures {clash} would overwrite the row's identity; name the figure otherwise")
    return {"method": row.name, "family": row.family, "params": dict(row.params), **figures}
