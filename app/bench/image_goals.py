"""The goal of issue #28 read off ``diffexit bench images``' rows: composing techniques must beat every one alone.

At each PSNR level the cheapest row (least ``layer_ratio``) reaching it is found twice: among single techniques (fewer
steps, FirstBlockCache, TaylorSeer, MagCache, exits alone: DeeDiff, static depths, similarity exits) and among
composed rows (family ``composed``, and DeeDiff calibrations run at a step count of their own, which compose exits
with fewer steps). A level is met when the composed row costs at most :data:`COST_SHARE` of the single one, and its
batch-16 wall speedup is at least :data:`WALL_SHARE` of its cost's reciprocal (the saving shows on the clock). The
goal is met at :data:`LEVELS_NEEDED` levels or more.
"""

from __future__ import annotations

import math
from typing import Optional

LEVELS = (20.0, 23.0, 25.0)  # PSNR against the shipped model at full depth, dB
LEVELS_NEEDED = 2
COST_SHARE = 0.8
WALL_SHARE = 0.8
REFERENCES = ("full", "base")  # families that are the references, not techniques


def is_composed(row: dict) -> bool:
    """Whether ``row`` joins techniques (family ``composed``, or a calibration run at its own step count)."""
    return row["family"] == "composed" or row["family"].endswith("-steps")


def _psnr(row: dict) -> float:
    # A row whose images are bit-identical to the reference has no finite PSNR: it reaches every level.
    return math.inf if row.get("identical_to_full") else row["psnr"]


def _cheapest(rows: list[dict], level: float) -> Optional[dict]:
    reaching = [r for r in rows if _psnr(r) >= level]
    return min(reaching, key=lambda r: r["layer_ratio"]) if reaching else None


def _brief(row: Optional[dict]) -> Optional[dict]:
    if row is None:
        return None
    return {k: row.get(k) for k in ("method", "family", "layer_ratio", "psnr", "speedup_wall_b16", "noisy")}


def goals_block(rows: list[dict]) -> dict:
    """``{"levels": [{"psnr", "single", "composed", "cost_share", "wall_share", "met"}], "levels_met", "met"}``;
    ``single`` and ``composed`` are the cheapest rows reaching the level (``None`` when none does), ``cost_share``
    the composed row's cost over the single one's, ``wall_share`` its batch-16 speedup times its cost."""
    ran = [r for r in rows if r.get("skipped") is None and r["family"] not in REFERENCES]
    singles = [r for r in ran if not is_composed(r)]
    composed = [r for r in ran if is_composed(r)]
    levels = []
    for level in LEVELS:
        single, comp = _cheapest(singles, level), _cheapest(composed, level)
        cost_share = wall_share = None
        met = False
        if single is not None and comp is not None:
            cost_share = comp["layer_ratio"] / single["layer_ratio"]
            wall_share = comp["speedup_wall_b16"] * comp["layer_ratio"]
            met = cost_share <= COST_SHARE and wall_share >= WALL_SHARE
        levels.append({"psnr": level, "single": _brief(single), "composed": _brief(comp), "cost_share": cost_share,
                       "wall_share": wall_share, "met": met})
    met = sum(level["met"] for level in levels)
    return {"levels": levels, "levels_met": met, "met": met >= LEVELS_NEEDED}
