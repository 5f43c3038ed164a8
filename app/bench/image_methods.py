"""The rows of ``diffexit bench images``: each a :class:`Method` that sets up a pipeline (:class:`Session`) for one
way of saving compute, on a :class:`Bench` that all of them share.

A builder that cannot run here (no UEM weights, a calibration for other settings) raises :class:`MethodSkipped`, and
the row says why instead of carrying figures.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ...common.schedules import ThresholdSchedule
from ...uem.block_adapters import num_blocks
from . import image_caches as caches

# Constant DeeDiff thresholds on the mean token uncertainty, and schedules that allow earlier exits on noisy steps,
# per UEM target: each target's uncertainty lives on its own scale (paper: the error against the true noise, which
# stays high on noisy steps; exit-cost: the distance from full depth, near 0 at deep blocks; normalized: a share in
# [0, 1)). Unknown targets use the paper's grid.
THRESHOLDS = {"paper": (0.05, 0.1, 0.15, 0.2, 0.3), "exit-cost": (0.02, 0.05, 0.1, 0.2), "normalized": (0.2, 0.4, 0.6)}
SCHEDULES = {"paper": (ThresholdSchedule("linear", 0.3, 0.1), ThresholdSchedule("cosine", 0.2, 0.05)),
             "exit-cost": (ThresholdSchedule("linear", 0.2, 0.02),), "normalized": (ThresholdSchedule("linear", 0.6, 0.2),)}
# Static depths as fractions of the model's blocks, per equal stretch of sampling progress (noisiest first): shallow
# first (ASE-style), deep first (where the calibrations keep depth), DuoDiff's switch from a shallow network on the
# first steps to the full one, and one fixed depth.
STATIC_FRACTIONS = ((1 / 3, 2 / 3, 1.0), (1 / 4, 1 / 2, 3 / 4, 1.0), (1.0, 2 / 3, 1 / 3), (1.0, 1 / 2),
                    (1 / 2, 1.0, 1.0, 1.0), (1 / 3, 1.0, 1.0, 1.0), (1 / 2,))
STEP_FRACTIONS = (1 / 4, 1 / 3, 1 / 2, 2 / 3)
FBC_THRESHOLDS = (0.05, 0.1, 0.2, 0.4)  # diffusers' default is 0.05
# TaylorSeer: (one full step in every `interval`, full warm-up steps); diffusers' default is (5, 3). On the digits
# DiT at 10 steps one warm-up step and intervals of 4-6 were its cheapest settings per PSNR.
TAYLORSEER_SETTINGS = ((2, 1), (3, 1), (4, 1), (5, 1), (6, 1), (3, 2), (4, 2), (5, 3))
# MagCache: (accumulated-error threshold, most steps skipped in a row); diffusers' default is (0.06, 3).
MAGCACHE_SETTINGS = ((0.06, 3), (0.12, 3), (0.25, 4), (0.4, 5))
# MuE's similarity exit: constant tolerances on the relative change a block makes, and calibrated budgets.
SIMILARITY_TOLERANCES = (0.02, 0.05, 0.1)
SIMILARITY_BUDGETS = (0.01, 0.02)

class MethodSkipped(Exception):
    """Raised by a method's builder when it cannot run here; the message is the reason the row reports."""


@dataclass
class Heads:
    """One set of UEM heads: ``target`` (from its config) names its rows; ``calibrations`` are the
    ``diffexit calibrate uem`` files found beside it, as ``(label, path, steps they were made for)``."""

    target: str
    uem: torch.nn.Module
    directory: Path
    calibrations: list[tuple[str, Path, int]]


@dataclass
class Bench:
    """What every method shares.

    Attributes:
        pipe: the pipeline all methods run on (float32, eval); its transformer is never modified.
        heads: the UEM heads by target, empty when there are none (``uem_missing`` says why).
        uem_missing: why there are no heads.
        steps: full sampling steps.
        guidance_scale: classifier-free guidance weight used by every method.
        base_pipe: the pipeline as shipped, when the UEMs brought their own fine-tuned backbone; else ``None``.
    """

    pipe: object
    heads: dict[str, Heads]
    uem_missing: str
    steps: int
    guidance_scale: float
    base_pipe: object = None

    @property
    def num_blocks(self) -> int:
        return num_blocks(self.pipe.transformer)

    def copy_pipe(self):
        """A pipeline of the same class around a deep copy of the transformer and the scheduler, to hook freely."""
        components = {**self.pipe.components, "transformer": copy.deepcopy(self.pipe.transformer),
                      "scheduler": copy.deepcopy(self.pipe.scheduler)}
        pipe = type(self.pipe)(**components)
        pipe.set_progress_bar_config(disable=True)
        return pipe


class Session:
    """A pipeline configured for one method.

    Args:
        pipe: the pipeline to call.
        steps: sampling steps per call.
        exit_scheduler: the ``ExitAwareScheduler`` in ``pipe.scheduler``, when the method exits early.
        call_context: wraps every pipeline call (FirstBlockCache sets its cache context there).
    """

    def __init__(self, pipe, steps: int, *, exit_scheduler=None,
                 call_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.pipe = pipe
        self.steps = steps
        self.exit_scheduler = exit_scheduler
        self.call_context = call_context

    def generate(self, labels: torch.Tensor, seed: int, guidance_scale: float) -> torch.Tensor:
        """Images ``[len(labels), C, S, S]`` in [0, 1], from the noise ``seed`` draws."""
        with self.call_context():
            return self.pipe(labels.tolist(), guidance_scale=guidance_scale,
                             generator=torch.Generator().manual_seed(seed), num_inference_steps=self.steps,
                             output_type="pt").images.cpu()


@dataclass(frozen=True)
class Method:
    """One row: ``build(bench)`` returns the :class:`Session` that generates its images (or raises MethodSkipped)."""

    name: str
    family: str  # groups rows in the plots
    params: dict
    build: Callable[[Bench], Session]


def plain(steps: Optional[int] = None, base: bool = False) -> Callable[[Bench], Session]:
    """The pipeline unchanged, at ``steps`` (default: the full steps); ``base``: the shipped backbone."""

    def build(bench: Bench) -> Session:
        if base and bench.base_pipe is None:
            raise MethodSkipped("the UEMs use the shipped backbone, so this row would repeat full depth")
        return Session(bench.base_pipe if base else bench.pipe, steps or bench.steps)

    return build


def exits(method: str, params: dict, target: Optional[str] = None,
          steps: Optional[int] = None) -> Callable[[Bench], Session]:
    """Early exits by ``method`` and its ``params`` (:class:`~diffexit.uem.exit_config.EarlyExitConfig`), reading
    the heads trained on ``target`` (``None``: the rule reads no heads), on a copy of the bench's pipeline through
    ``attach_early_exits``, at ``steps`` (default: the full steps). A calibration made for another setup or other
    weights skips the row, saying why."""

    def build(bench: Bench) -> Session:
        from ...samplers.early_exits import attach_early_exits
        from ...uem.exit_config import EarlyExitConfig

        if target is not None and target not in bench.heads:
            raise MethodSkipped(bench.uem_missing)
        config = EarlyExitConfig(method, **params,
                                 uem=None if target is None else str(bench.heads[target].directory))
        pipe = bench.copy_pipe()
        try:
            attach_early_exits(pipe, config, steps=steps or bench.steps, guidance_scale=bench.guidance_scale)
        except ValueError as e:
            if not config.calibrated:
                raise
            raise MethodSkipped(str(e)) from None
        return Session(pipe, steps or bench.steps, exit_scheduler=pipe.scheduler)

    return build


def diffusers_cache(apply: Callable[[Bench, torch.nn.Module], None],
                    steps: Optional[int] = None) -> Callable[[Bench], Session]:
    """One of diffusers' cache hooks (:mod:`~diffexit.app.bench.image_caches`), put on a copy of the transformer by
    ``apply(bench, transformer)``, sampled at ``steps`` (default: the full steps)."""

    def build(bench: Bench) -> Session:
        pipe = bench.copy_pipe()
        try:
            apply(bench, pipe.transformer)
        except ValueError as e:
            raise MethodSkipped(str(e)) from None
        return Session(pipe, steps or bench.steps, call_context=lambda: caches.fresh_cache(pipe.transformer))

    return build


def similarity_calibrated(budget: float, **remainder) -> Callable[[Bench], Session]:
    """MuE's similarity exit with per-step tolerances calibrated on this backbone for ``budget`` (one image per digit
    twice, from seeds no benchmarked image uses, and as many held out), through ``attach_early_exits``, with the
    cached-remainder settings ``remainder``."""

    def build(bench: Bench) -> Session:
        import tempfile

        from ...samplers.early_exits import attach_early_exits
        from ...uem.calibration import calibrate_similarity
        from ...uem.exit_config import EarlyExitConfig

        labels = torch.arange(20) % 10
        with torch.no_grad():
            made, = calibrate_similarity(bench.pipe.transformer, bench.pipe.scheduler, labels, labels,
                                         budgets=[budget], steps=bench.steps, guidance_scale=bench.guidance_scale,
                                         seed=caches.MAG_CALIBRATION_SEED)
        folder = Path(tempfile.mkdtemp(prefix="diffexit-similarity-"))
        path = made.save(folder / f"calibration-{budget:g}.json")
        pipe = bench.copy_pipe()
        attach_early_exits(pipe, EarlyExitConfig("similarity", calibration=str(path), **remainder),
                           steps=bench.steps, guidance_scale=bench.guidance_scale)
        return Session(pipe, bench.steps, exit_scheduler=pipe.scheduler)

    return build


def _mag(threshold, max_skip, steps):
    def apply(bench, model):
        ratios = caches.mag_ratios(bench.copy_pipe(), steps, bench.guidance_scale)
        caches.apply_magcache(model, ratios, threshold, max_skip, steps)

    return apply


def image_methods(num_blocks: int, steps: int, heads: Sequence[Heads] = ()) -> list[Method]:
    """The benchmark's rows for a model of ``num_blocks`` blocks sampled at ``steps`` steps; full depth first.

    DeeDiff rows come per set of ``heads`` (named by target), with each set's calibration files; without heads, one
    ``deediff`` row stands for them and reports why it was skipped.
    """
    methods = [Method("full", "full", {"steps": steps, "blocks": num_blocks}, plain()),
               Method("full-base", "base", {"steps": steps, "backbone": "shipped"}, plain(base=True))]
    if not heads:
        methods.append(Method("deediff", "deediff", {}, exits("deediff", {"threshold": 0.1}, "paper")))
    for h in heads:
        for t in THRESHOLDS.get(h.target, THRESHOLDS["paper"]):
            methods.append(Method(f"deediff-{h.target}-{t:g}", f"deediff-{h.target}", {"target": h.target, "threshold": t},
                                  exits("deediff", {"threshold": t}, h.target)))
        for s in SCHEDULES.get(h.target, SCHEDULES["paper"]):
            methods.append(Method(f"deediff-{h.target}-{s.kind}-{s.high:g}-{s.low:g}", f"deediff-{h.target}-schedule",
                                  {"target": h.target, "schedule": s.to_dict()},
                                  exits("deediff", {"threshold": s.to_dict()}, h.target)))
        for label, path, made_for in h.calibrations:
            # A calibration runs at the step count it was made for: DeeDiff composed with fewer steps.
            family = f"deediff-{h.target}-calibrated" + ("" if made_for == steps else f"-{made_for}-steps")
            methods.append(Method(f"deediff-{h.target}-cal-{label}", family,
                                  {"target": h.target, "calibration": path.name, "steps": made_for},
                                  exits("deediff", {"calibration": str(path)}, h.target, made_for)))
    static = []
    for fractions in STATIC_FRACTIONS:
        depths = tuple(max(1, round(f * num_blocks)) for f in fractions)
        if depths not in static:
            static.append(depths)
    for depths in static:
        methods.append(Method("static-" + "-".join(map(str, depths)), "static", {"depths": list(depths)},
                              exits("static", {"depths": list(depths)})))
    fewer = sorted({max(1, round(f * steps)) for f in STEP_FRACTIONS} - {steps})
    for n in fewer:
        methods.append(Method(f"steps-{n}", "steps", {"steps": n}, plain(n)))
    for t in FBC_THRESHOLDS:
        methods.append(Method(f"fbc-{t:g}", "fbc", {"threshold": t},
                              diffusers_cache(lambda bench, model, t=t: caches.apply_first_block_cache(model, t))))
    for interval, warmup in TAYLORSEER_SETTINGS:
        methods.append(Method(f"taylorseer-{interval}-{warmup}", "taylorseer", {"interval": interval, "warmup": warmup},
                              diffusers_cache(lambda bench, model, i=interval, w=warmup:
                                              caches.apply_taylorseer(model, i, w))))
    for threshold, max_skip in MAGCACHE_SETTINGS:
        methods.append(Method(f"magcache-{threshold:g}-{max_skip}", "magcache",
                              {"threshold": threshold, "max_skip": max_skip},
                              diffusers_cache(_mag(threshold, max_skip, steps))))
    for tolerance in SIMILARITY_TOLERANCES:
        methods.append(Method(f"similarity-{tolerance:g}", "similarity", {"tolerance": tolerance},
                              exits("similarity", {"tolerance": tolerance})))
    for budget in SIMILARITY_BUDGETS:
        methods.append(Method(f"similarity-cal-{budget:g}", "similarity-calibrated", {"budget": budget},
                              similarity_calibrated(budget)))
    methods += composed_methods(num_blocks, steps, heads)
    return methods


# Composed rows. Fewer steps with shallow exits whose skipped blocks add their cached residuals, refreshed at every
# other step (named e2), or at the first two and the last (f2-l1): (step fraction, remainder settings).
FEWER_STEPS_REMAINDER = ((0.4, {"refresh_every": 2}), (0.6, {"refresh_every": 2}),
                         (0.5, {"refresh_first": 2, "refresh_last": 1}))
# TaylorSeer's step skipping (one computing step in every half of the steps, after one full step) with exits on the
# steps that compute, their skipped blocks extrapolated: static depth fractions per stretch of sampling, noisiest
# first, and the exit-cost heads' calibrations by budget.
SKIPPING_DEPTHS = ((1 / 2, 2 / 3, 1.0), (2 / 3, 1.0), (1 / 2, 1.0), (1 / 2, 5 / 6), (1 / 2,))
SKIPPING_BUDGETS = ("0.01", "0.02")


def composed_methods(num_blocks: int, steps: int, heads: Sequence[Heads] = ()) -> list[Method]:
    """The ``composed`` rows, each named by its techniques joined with ``+``."""
    methods = []
    for fraction, refresh in FEWER_STEPS_REMAINDER:
        n = max(2, round(fraction * steps))
        tag = "-".join(f"{k.removeprefix('refresh_')[0]}{v}" for k, v in refresh.items())
        params = {"depths": [1], "remainder": "cached", **refresh}
        methods.append(Method(f"static-1+cached-{tag}+steps-{n}", "composed", {**params, "steps": n},
                              exits("static", params, steps=n)))
    every = max(2, steps // 2)
    skip = {"remainder": "taylor", "exit_every": every}
    for fractions in SKIPPING_DEPTHS:
        depths = [max(1, round(f * num_blocks)) for f in fractions]
        methods.append(Method("static-" + "-".join(map(str, depths)) + f"+taylor-skip{every}", "composed",
                              {"depths": depths, **skip}, exits("static", {"depths": depths, **skip})))
    for h in heads:
        if h.target != "exit-cost":
            continue
        for label, path, made_for in h.calibrations:
            if made_for == steps and label.split("-steps")[0] in SKIPPING_BUDGETS:
                methods.append(Method(f"deediff-{h.target}-cal-{label}+taylor-skip{every}", "composed",
                                      {"target": h.target, "calibration": path.name, **skip},
                                      exits("deediff", {"calibration": str(path), **skip}, h.target)))
    return methods
