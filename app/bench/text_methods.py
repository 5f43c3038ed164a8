"""The rows of ``diffexit bench text``: every decoding configuration it runs, with its name, family and params."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ...common.schedules import ThresholdSchedule
from ...dllm.commit_rule import FILENAME as COMMIT_FILENAME, CommitRule
from ...dllm.halting import HaltingRule, Prophet, SchED
from .rows import RowId

PIPELINE_BLOCK = 8
PIPELINE_THRESHOLD = 0.95  # BlockRefinementScheduler's default: it also commits every token this probable
PARALLEL_THRESHOLD = 0.9
ORACLES = ("halt", "commit")
COMMIT_ORACLE_NOTE = ("a reference point, not a bound: each token committed at the first pass after which its argmax "
                      "never changes in the recorded full-steps run, one pass per distinct commit pass")


@dataclass
class Method:
    """One decoding configuration. ``halting`` builds a fresh rule per batch (rules keep per-sample state)."""

    name: str
    family: str  # the legend entry in the plots
    params: dict
    halting: Optional[Callable[[], HaltingRule]] = None
    parallel_threshold: Optional[float] = None
    one_step: bool = False
    cache: Optional[str] = None
    # None, a whole number k or "confidence:C": when the approximate cache's kept K/V are rewritten
    # (diffexit.dllm.kv_cache).
    cache_refresh: Optional[object] = None
    # Run inside LLaDA2Pipeline instead of generate(): "stock" (BlockRefinementScheduler), "sched"
    # (SchEDScheduler, cosine) or "sched-off" (SchEDScheduler that never halts: isolates the pass it saves at
    # each block end from what halting saves).
    pipeline: Optional[str] = None
    # Fed the recorded full-steps run of the same batch: "halt" decodes with the halting oracle, "commit" is the
    # commit oracle, counted on the recording (it never decodes, so it has no wall-clock).
    oracle: Optional[str] = None

    def __post_init__(self):
        if self.oracle not in (None, *ORACLES):
            raise ValueError(f"oracle must be None or one of {ORACLES}, got {self.oracle!r}")

    @property
    def halts(self) -> bool:
        """Whether the row halts the span (a rule, or the halting oracle): such rows report passes over the
        oracle's."""
        return self.halting is not None or self.oracle == "halt"

    @property
    def identity(self) -> RowId:
        return RowId(self.name, self.family,
                     {**self.params, "cache": self.cache, "parallel_threshold": self.parallel_threshold,
                      **({"cache_refresh": self.cache_refresh} if self.cache_refresh is not None else {})})


def sched_methods() -> list[Method]:
    """The paper's grid: linear, cosine, and exp at k = 2, 4, 8, 16, each with low = 2.5 and low = 0."""
    out = []
    for low in (2.5, 0.0):
        kinds = [("linear", None), ("cosine", None)] + [("exp", k) for k in (2.0, 4.0, 8.0, 16.0)]
        for kind, k in kinds:
            sched = ThresholdSchedule(kind, 7.5, low, k=k)
            name = f"sched-{kind}" + (f"-k{k:g}" if k else "") + f"-low{low:g}"
            out.append(Method(name, "sched", {"schedule": sched.to_dict(), "stat": "mean"},
                              halting=lambda s=sched: SchED(s)))
    return out


ROBUST_STATS = ("min", "quantile")
# max_entropy halting compares minus the worst masked position's entropy (nats) with the schedule: from "every
# position below 0.1 nats" early on to "below 1 nat" at the end.
ENTROPY_SCHEDULE = ThresholdSchedule("linear", -0.1, -1.0)


# A flat, low threshold for the robust statistics. The paper's schedules start at 7.5, which no minimum margin
# clears before the answer is nearly decoded, while the halting oracle halts pick and zip after 2 passes. Chosen on
# held-out draw 1 (64 prompts a task, 24 of chain; the bench decodes draw 0): at the first pass the smallest masked
# margin was at most 0.35 on pick and zip, and at the second, once one token of the choice is committed, at least
# 2.5; on chain a flat 1.0 changed 1 answer of 24, 1.5 and above none.
FLAT_SCHEDULE = ThresholdSchedule("constant", 2.0, 2.0)


def stat_methods(ignore_token_ids: tuple[int, ...]) -> list[Method]:
    """SchED with the statistics beyond the paper's mean, each at the paper's cosine (7.5 -> 2.5) and at a linear
    schedule down to 0, the robust ones also at :data:`FLAT_SCHEDULE`; ``max_entropy`` at
    :data:`ENTROPY_SCHEDULE`. ``ignore_token_ids``: EOS and padding."""
    out = []
    for stat in ("median", "quantile", "min", "mean_content"):
        flat = (FLAT_SCHEDULE,) if stat in ROBUST_STATS else ()
        for sched in (ThresholdSchedule("cosine", 7.5, 2.5), ThresholdSchedule("linear", 7.5, 0.0), *flat):
            ignore = ignore_token_ids if stat == "mean_content" else ()
            level = f"{sched.high:g}" if sched.kind == "constant" else f"-low{sched.low:g}"
            out.append(Method(f"sched-{sched.kind}{level}-{stat}", f"sched ({stat})",
                              {"schedule": sched.to_dict(), "stat": stat, **({"q": 0.1} if stat == "quantile" else {})},
                              halting=lambda s=sched, st=stat, ig=ignore: SchED(s, stat=st, ignore_token_ids=ig)))
    out.append(Method("sched-max_entropy", "sched (max_entropy)",
                      {"schedule": ENTROPY_SCHEDULE.to_dict(), "stat": "max_entropy"},
                      halting=lambda: SchED(ENTROPY_SCHEDULE, stat="max_entropy")))
    return out


def cache_methods(schedule: ThresholdSchedule) -> list[Method]:
    """Each cache alone, with parallel commits, with SchED (``schedule``), and with both."""
    out = []
    for cache in ("prefix", "dual"):
        for name, family, halting, parallel in (("full", "full", False, None),
                                                ("parallel", "parallel", False, PARALLEL_THRESHOLD),
                                                ("sched-cosine", "sched", True, None),
                                                ("sched-cosine+parallel", "sched-cosine+parallel", True,
                                                 PARALLEL_THRESHOLD)):
            params = {**({"schedule": schedule.to_dict()} if halting else {}),
                      **({"threshold": parallel} if parallel else {})}
            out.append(Method(f"{name}+{cache}", family, params,
                              halting=(lambda: SchED(schedule)) if halting else None,
                              parallel_threshold=parallel, cache=cache))
    return out


def robust_cache_methods() -> list[Method]:
    """SchED with the robust statistics (cosine), over the prefix cache, without and with parallel commits: the
    composed rows both models run (issue #27)."""
    cosine = ThresholdSchedule("cosine", 7.5, 2.5)
    out = []
    for parallel in (None, PARALLEL_THRESHOLD):
        for stat in ROBUST_STATS:
            params = {"schedule": cosine.to_dict(), "stat": stat,
                      **({"q": 0.1} if stat == "quantile" else {}), **({"threshold": parallel} if parallel else {})}
            name = f"sched-cosine-{stat}" + ("+parallel" if parallel else "") + "+prefix"
            out.append(Method(name, f"sched ({stat})" + ("+parallel" if parallel else ""), params,
                              halting=lambda st=stat: SchED(cosine, stat=st), parallel_threshold=parallel,
                              cache="prefix"))
    return out


def refresh_methods() -> list[Method]:
    """Full steps over the approximate caches, their kept K/V rewritten at the step after one that committed a
    token at probability <= 0.9: the best setting of ``scripts/cache_refresh_curve.py`` (issue #27)."""
    return [Method(f"full+{cache}+refresh-conf0.9", "full", {}, cache=cache, cache_refresh="confidence:0.9")
            for cache in ("prefix", "dual")]


def oracle_methods() -> list[Method]:
    """The halting oracle (the fewest passes any span-halting rule can take and keep every full-steps answer) and
    the commit oracle (:data:`COMMIT_ORACLE_NOTE`), both read from the recorded full steps of the same batch."""
    return [Method("oracle-halt", "oracle-halt", {"oracle": "first pass whose masked argmax is the full-steps answer"},
                   oracle="halt"),
            Method("oracle-commit", "oracle-commit", {"oracle": COMMIT_ORACLE_NOTE}, oracle="commit")]


def all_methods(ignore_token_ids: tuple[int, ...]) -> list[Method]:
    """Every row of a bidirectional model; ``ignore_token_ids`` (EOS, padding) feed the ``mean_content``
    statistic."""
    cosine = ThresholdSchedule("cosine", 7.5, 2.5)
    pipeline = {"block_length": PIPELINE_BLOCK, "threshold": PIPELINE_THRESHOLD}
    return [
        Method("full", "full", {"steps": "full"}),
        Method("one-step", "one-step", {"steps": 1}, one_step=True),
        *oracle_methods(),
        *sched_methods(),
        *stat_methods(ignore_token_ids),
        Method("prophet", "prophet", Prophet().to_dict(), halting=lambda: Prophet()),
        Method("parallel", "parallel", {"threshold": PARALLEL_THRESHOLD}, parallel_threshold=PARALLEL_THRESHOLD),
        Method("sched-cosine+parallel", "sched-cosine+parallel",
               {"schedule": cosine.to_dict(), "threshold": PARALLEL_THRESHOLD},
               halting=lambda: SchED(cosine), parallel_threshold=PARALLEL_THRESHOLD),
        *cache_methods(cosine),
        *robust_cache_methods(),
        *refresh_methods(),
        Method("llada2-stock", "llada2-stock", {**pipeline, "scheduler": "BlockRefinementScheduler"},
               pipeline="stock"),
        Method("llada2-sched-off", "llada2-sched-off",
               {**pipeline, "scheduler": "SchEDScheduler", "schedule": "never halts"}, pipeline="sched-off"),
        Method("llada2-sched", "llada2-sched", {**pipeline, "scheduler": "SchEDScheduler",
                                                "schedule": cosine.to_dict()}, pipeline="sched"),
    ]


def block_methods() -> list[Method]:
    """The rows of a block-causal model: full steps, the oracles, the exact prefix cache, parallel commits over
    it, and the composed rows. No one-step, Prophet, dual-cache or pipeline rows: a block-causal model decodes in
    its own blocks, and Prophet and the dual cache are refused on it."""
    return [Method("full", "full", {"steps": "full"}), *oracle_methods(),
            Method("full+prefix", "full", {}, cache="prefix"),
            Method("parallel+prefix", "parallel", {"threshold": PARALLEL_THRESHOLD},
                   parallel_threshold=PARALLEL_THRESHOLD, cache="prefix"), *robust_cache_methods()]


def learned_methods(model) -> list[Method]:
    """The learned commit rule (:mod:`diffexit.dllm.commit_rule`) in both modes at its calibrated thresholds,
    without cache and over the prefix cache (on a block-causal model, the exact cache); none when no commit model
    is shipped beside ``model``'s weights (``diffexit train commit`` writes one)."""
    folder = getattr(model.config, "_name_or_path", "") or ""
    if not folder or not (Path(folder) / COMMIT_FILENAME).is_file():
        return []
    out = []
    for cache in (None, "prefix"):
        for mode in ("commit", "halt"):
            out.append(Method(f"learned-{mode}" + (f"+{cache}" if cache else ""), f"learned-{mode}",
                              {"commit": mode, "threshold": "calibrated"},
                              halting=lambda m=mode: CommitRule("learned", m), cache=cache))
    return out


def select(methods: list[Method], patterns: list[str]) -> list[Method]:
    """The methods whose name matches one of the fnmatch ``patterns``, plus ``full`` (every row is measured
    against it) and, when a pipeline row is kept, ``llada2-stock`` (its baseline); order kept."""
    keep = {m.name for m in methods if any(fnmatch.fnmatchcase(m.name, p) for p in patterns)}
    keep.add("full")
    if any(m.pipeline for m in methods if m.name in keep):
        keep.add("llada2-stock")
    return [m for m in methods if m.name in keep]
