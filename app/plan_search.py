"""The search behind ``diffexit calibrate images``: the settings it tries (steps x early exits x cached remainders x
diffusers caches), what each costs and how close it stays to full depth, and the cheapest that meets a PSNR target.

A :class:`Planner` measures a setting on round-robin labels against the same pipeline at full depth and full steps
from the same noise: ``layer_ratio`` (transformer blocks run over what the reference runs, counted by hooks on the
blocks as ``diffexit bench images`` counts them, :func:`~diffexit.app.bench.image_runs.run_quality`) and ``psnr``
(dB, pixels in [0, 1]). :meth:`Planner.screen_all` runs every setting on a few screening samples, leaving out the
dominated ones; :meth:`Planner.pick` confirms the promising ones on all calibration samples, cheapest first.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..uem.exit_config import EarlyExitConfig
from ..uem.image_quality import psnr
from .bench.image_methods import Session
from .bench.image_runs import Quality, run_quality
from .image_plan import PlanSettings, planned_pipeline

STEP_FRACTIONS = (0.2, 0.24, 0.28, 0.32, 0.4, 0.48, 0.6, 0.8)  # of the full steps: 5 6 7 8 10 12 15 20 of 25
FBC_THRESHOLDS = (0.05, 0.1, 0.2, 0.3)
TAYLORSEER = ((2, 1), (3, 2), (4, 2))  # diffusers' TaylorSeer: (one full step in every N, full warm-up steps)
# Cached remainders for the exits: (kind, a full-depth step every N steps), with the last step at full depth too.
# Refreshing every 2-3 steps kept 21-25 dB on the embedded DiT at 10-12 steps; never refreshing fell to 14-19 dB.
REMAINDERS = (("taylor", 2), ("taylor", 3))
# Training-free exits for the remainders: one fixed depth, as a share of the blocks.
STATIC_FRACTIONS = (1 / 3, 1 / 2)
# How far a few screening samples' PSNR strays from the calibration set's: on the embedded DiT, 4 samples read up to
# 3.3 dB off 16 (TaylorSeer 4-2 at 20 steps: 26.7 dB against 30.0).
MARGIN_DB = 3.0
HELD_OUT_SEED = 1 << 20  # held-out batches are seeded from --seed plus this: no calibration batch shares a seed


class NoPlan(ValueError):
    """No searched setting meets the target; the message names the closest."""


@dataclass
class Tried:
    """One searched setting and what it measured (``screen``, ``calibration``: ``(layer_ratio, psnr)``; a PSNR of
    ``inf`` where the images equal the reference), or why it was not run.

    ``chain`` names the setting with its step count left out (along a chain, more steps cost more and come closer to
    full); ``group`` the setting with its threshold or budget left out, which ``looseness`` orders (a looser one
    skips more work and strays further).
    """

    settings: PlanSettings
    chain: str
    group: str
    looseness: float = 0.0
    screen: Optional[tuple[float, float]] = None
    calibration: Optional[tuple[float, float]] = None
    skipped: Optional[str] = None

    def to_dict(self) -> dict:
        figures = {k: None if v is None else {"layer_ratio": v[0], "psnr": finite(v[1])}
                   for k, v in (("screen", self.screen), ("calibration", self.calibration))}
        return {"name": self.settings.name, **figures, **({"skipped": self.skipped} if self.skipped else {})}


@dataclass(frozen=True)
class CalibratedExit:
    """Exits by one ``diffexit calibrate uem`` file: the config, and the step count, budget and minimum-depth mode
    (``"auto"`` or a fixed depth) the file was made with."""

    config: EarlyExitConfig
    steps: int
    budget: float
    min_depth: str


def search_space(full_steps: int, model_blocks: int, exits: Sequence[CalibratedExit]) -> list[Tried]:
    """Every setting searched at ``full_steps`` on a model of ``model_blocks`` blocks: fewer steps, FirstBlockCache,
    each of ``exits`` (those made for more than ``full_steps`` steps are left out) alone and with each cached
    remainder, and static depths with each cached remainder."""
    steps = sorted({max(1, round(f * full_steps)) for f in STEP_FRACTIONS} - {full_steps})
    space = [Tried(PlanSettings(s), "plain", f"plain@{s}") for s in steps]
    space += [Tried(PlanSettings(s, cache={"kind": "fbc", "threshold": t}), f"fbc-{t:g}", f"fbc@{s}", t)
              for t in FBC_THRESHOLDS for s in steps + [full_steps]]
    space += [Tried(PlanSettings(s, cache={"kind": "taylorseer", "interval": n, "warmup": w}), f"taylorseer-{n}-{w}",
                    f"taylorseer-{w}@{s}", n) for n, w in TAYLORSEER for s in steps + [full_steps]]
    remainders = [("none", None)] + list(REMAINDERS)
    for e in exits:
        if e.steps > full_steps:
            continue
        for kind, every in remainders:
            config = dataclasses.replace(e.config, remainder=kind, refresh_every=every,
                                         refresh_last=None if kind == "none" else 1)
            key = f"{e.config.uem}:{e.min_depth}:{kind}:{every}"
            space.append(Tried(PlanSettings(e.steps, exits=config), f"{key}:{e.budget:g}", f"{key}@{e.steps}",
                               e.budget))
    depths = sorted({max(1, round(f * model_blocks)) for f in STATIC_FRACTIONS} - {model_blocks})
    for kind, every in REMAINDERS:
        for d in depths:
            config = EarlyExitConfig("static", depths=(d,), remainder=kind, refresh_every=every, refresh_last=1)
            # Shallower exits skip more: the group orders depths from the deepest.
            space += [Tried(PlanSettings(s, exits=config), f"static-{d}:{kind}:{every}", f"static:{kind}:{every}@{s}",
                            model_blocks - d) for s in steps + [full_steps]]
    return space


def calibrated_exits(uem_dirs: Sequence[Path]) -> list[CalibratedExit]:
    """Exits by each ``diffexit calibrate uem`` file beside the heads of each UEM folder."""
    from ..uem.calibration_file import Calibration, calibrations_in
    from ..uem.uem_folder import heads_dir

    found = []
    for directory in uem_dirs:
        for path in calibrations_in(heads_dir(directory)):
            made = Calibration.load(path)
            config = EarlyExitConfig("deediff", calibration=str(path.resolve()), uem=str(Path(directory).resolve()))
            found.append(CalibratedExit(config, made.sampler["steps"], made.budget,
                                        str(made.provenance.get("min_depth", "auto"))))
    return found


class Planner:
    """Measures settings of ``pipe`` against its full depth at ``full_steps`` on round-robin labels.

    Args:
        pipe: the pipeline as the user runs it (never modified: settings run on copies).
        full_steps, guidance_scale: the reference's sampling.
        samples, screen, batch: calibration samples, screening samples (the first ones), samples per call.
        seed: the first calibration batch's seed.
        num_classes: the labels cycle through ``0 .. num_classes - 1``.
    """

    def __init__(self, pipe, *, full_steps: int, guidance_scale: float, samples: int, screen: int, batch: int,
                 seed: int, num_classes: int):
        self.pipe, self.full_steps, self.guidance = pipe, full_steps, guidance_scale
        self.samples, self.screen, self.batch, self.seed = samples, min(screen, samples), batch, seed
        self.num_classes = num_classes
        self._references: dict[tuple[int, int, int], Quality] = {}

    def _labels(self, n: int) -> torch.Tensor:
        return torch.arange(n) % self.num_classes

    def _reference(self, n: int, batch: int, seed: int) -> Quality:
        if (n, batch, seed) not in self._references:
            with torch.no_grad():
                self._references[n, batch, seed] = run_quality(Session(self.pipe, self.full_steps), self._labels(n),
                                                               batch, seed, self.guidance)
        return self._references[n, batch, seed]

    def measure(self, settings: PlanSettings, n: int, batch: int, seed: int) -> tuple[float, float]:
        """``(layer_ratio, psnr)`` of ``settings`` on ``n`` samples against the reference from the same noise;
        ``ValueError`` if the settings do not fit the pipeline."""
        reference = self._reference(n, batch, seed)
        run = planned_pipeline(self.pipe, settings, self.guidance)
        session = Session(run.pipe, run.steps, exit_scheduler=run.exit_scheduler, call_context=run.call_context)
        with torch.no_grad():
            got = run_quality(session, self._labels(n), batch, seed, self.guidance)
        quality = psnr(got.images, reference.images)
        return got.block_rows / reference.block_rows, math.inf if quality is None else quality

    def screen_all(self, space: Sequence[Tried], targets: Sequence[float]) -> Sequence[Tried]:
        """Run ``space`` on the screening samples, fewest steps and tightest first, leaving out what cannot be
        needed: along a chain, the settings past one that clears the highest target by :data:`MARGIN_DB`; in a
        group, the settings looser than one that misses the lowest target by more than that."""
        cleared: dict[str, Tried] = {}
        missed: dict[str, Tried] = {}
        for t in tqdm(sorted(space, key=lambda t: (t.settings.steps, t.looseness)), desc="calibrate images: screening",
                      unit="setting"):
            if t.chain in cleared:
                t.skipped = (f"dominated: {cleared[t.chain].settings.name} already clears {max(targets):g} dB by "
                             f"{MARGIN_DB:g} on the screening samples, at fewer steps")
                continue
            if t.group in missed:
                t.skipped = (f"dominated: the tighter {missed[t.group].settings.name} already misses {min(targets):g} "
                             f"dB by more than {MARGIN_DB:g} on the screening samples")
                continue
            try:
                t.screen = self.measure(t.settings, self.screen, self.screen, self.seed)
            except ValueError as e:
                t.skipped = str(e)
                continue
            if t.screen[1] >= max(targets) + MARGIN_DB:
                cleared[t.chain] = t
            elif t.screen[1] < min(targets) - MARGIN_DB:
                missed[t.group] = t
        return space

    def pick(self, tried: Sequence[Tried], target: float) -> Tried:
        """The cheapest setting meeting ``target`` on all calibration samples, confirming the screened ones near
        it cheapest first; :class:`NoPlan` names the closest if none does."""
        # A setting that ran every block at every step (a cache that never fired) saves nothing: no plan.
        saving = [t for t in tried if t.screen is not None and t.screen[0] < 1]
        near = sorted((t for t in saving if t.screen[1] >= target - MARGIN_DB), key=lambda t: t.screen[0])
        best = None
        for t in tqdm(near, desc=f"calibrate images: confirming {target:g} dB", unit="setting"):
            if best is not None and t.screen[0] > best.calibration[0]:
                break  # screened costs track measured ones: nothing dearer on the screen is likely cheaper
            if t.calibration is None:
                t.calibration = self.measure(t.settings, self.samples, self.batch, self.seed)
            if t.calibration[1] >= target and t.calibration[0] < 1 and (best is None or
                                                                       t.calibration[0] < best.calibration[0]):
                best = t
        if best is not None:
            return best
        measured = [t for t in saving if (t.calibration or t.screen)[0] < 1]
        if not measured:
            reasons = sorted({t.skipped for t in tried if t.skipped and not t.skipped.startswith("dominated")})
            raise NoPlan("no searched setting ran and saved compute on this pipeline"
                         + (": " + "; ".join(reasons) if reasons else ""))
        closest = max(measured, key=lambda t: (t.calibration or t.screen)[1])
        cost, value = closest.calibration or closest.screen
        where = "the calibration" if closest.calibration else "the screening"
        raise NoPlan(f"no searched plan reaches {target:g} dB; the closest is {closest.settings.name} at {value:.2f} "
                     f"dB (cost {cost:.3f}) on {where} samples: ask for --psnr {math.floor(value * 10) / 10:g} or "
                     f"less, or sample at full steps without a plan")

    def held_out(self, settings: PlanSettings, samples: int) -> tuple[float, float]:
        """``(layer_ratio, psnr)`` of ``settings`` on ``samples`` fresh samples."""
        return self.measure(settings, samples, self.batch, self.seed + HELD_OUT_SEED)


def finite(value: float) -> Optional[float]:
    """JSON has no infinity: a PSNR of images equal to the reference is written as null."""
    return None if math.isinf(value) else value
