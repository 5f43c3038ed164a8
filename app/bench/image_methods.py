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
from typing import Callable, Iterator, Optional, Sequence

import torch

from ...common.schedules import ThresholdSchedule
from ...uem.block_adapters import num_blocks

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


def first_block_cache(threshold: float) -> Callable[[Bench], Session]:
    """diffusers' FirstBlockCache at ``threshold`` on a copy of the transformer."""

    def build(bench: Bench) -> Session:
        from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache
        from diffusers.models.cache_utils import CacheMixin

        pipe = bench.copy_pipe()
        model = pipe.transformer
        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=threshold))

        @contextlib.contextmanager
        def call_context() -> Iterator[None]:
            # DiT is no CacheMixin, and neither DiTPipeline nor ours names a cache context or resets the cache, so
            # both happen here. The reset makes each call start afresh rather than compare its first step with the
            # previous call's last one. CacheMixin.cache_context only sets the hooks' state, so it serves any model;
            # one context covers the whole call because the guided batch holds cond and uncond rows together.
            HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)
            with CacheMixin.cache_context(model, "cond"):
                yield

        return Session(pipe, bench.steps, call_context=call_context)

    return build


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
        methods.append(Method(f"fbc-{t:g}", "fbc", {"threshold": t}, first_block_cache(t)))
    return methods
