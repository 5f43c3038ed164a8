"""``diffexit calibrate images``: the cheapest sampling plan (steps x early exits x feature cache) that keeps a PSNR
target against full depth at full steps.

    diffexit calibrate images --psnr 25 --out plan.json
    diffexit generate images --plan plan.json --per-class 8 --out runs/gen-planned

The search runs on calibration samples of ``--model`` (default: the embedded digits DiT), labels round-robin over
the classes, in batches seeded ``--seed, --seed + 1, ...``. Every setting is measured against the same pipeline at
full depth and ``--steps`` steps from the same noise: ``layer_ratio`` (the cost: transformer blocks run over what the
reference runs, counted by hooks on the blocks, as ``diffexit bench images`` counts them) and ``psnr`` (dB, pixels in
[0, 1]). The settings searched, never the reference itself:

- fewer steps, each alone and with diffusers' FirstBlockCache at each threshold in :data:`FBC_THRESHOLDS` or its
  TaylorSeer at each of :data:`TAYLORSEER` (caches at the full step count too);
- DeeDiff exits by each ``diffexit calibrate uem`` file beside the heads in ``--uem`` (an exit-error budget at the
  step count it was made for; default: the shipped heads of the exit-trained backbone), alone and with each cached
  remainder in :data:`REMAINDERS` (the skipped blocks add their last residual, extrapolated, with full-depth refresh
  steps: :mod:`diffexit.uem.cached_remainder`);
- training-free static exits at the depths in :data:`STATIC_FRACTIONS` with each cached remainder.

The diffusers caches do not follow exits (:mod:`diffexit.app.image_plan`), so no setting joins the two.

How: every setting first runs on ``--screen`` samples, fewest steps and tightest first. Along one setting at growing
step counts, once one clears the target by :data:`MARGIN_DB` the larger ones (dearer, and no better needed) are not
run; at one step count, once a setting misses it by more than that, the looser ones of its kind (a higher cache
threshold or exit budget, a shallower exit) are not run. Those within
:data:`MARGIN_DB` of the target then run on all ``--samples``, cheapest first, until the cheapest that meets it there
is known. That plan runs on ``--held-out`` fresh samples, and the check (met or not, its cost and PSNR) is printed
and recorded in the plan file (:mod:`diffexit.app.image_plan`). No setting meeting the target is an error that names
the closest. ``plan_methods`` gives ``diffexit bench images`` the picks as rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..common.cli_help import HelpFormatter
from ..uem.block_adapters import num_blocks
from ..uem.exit_config import EarlyExitConfig
from ..uem.image_quality import psnr
from .bench.image_methods import Method, MethodSkipped, Session
from .bench.image_runs import Quality, run_quality
from .image_plan import ImagePlan, PlanSettings, describe_pipeline, planned_pipeline

STEP_FRACTIONS = (0.2, 0.24, 0.28, 0.32, 0.4, 0.48, 0.6, 0.8)  # of the full steps: 5 6 7 8 10 12 15 20 of 25
FBC_THRESHOLDS = (0.05, 0.1, 0.2, 0.3)
TAYLORSEER = ((2, 1), (3, 2), (4, 2))  # diffusers' TaylorSeer: (one full step in every N, full warm-up steps)
# Cached remainders for the exits: (kind, a full-depth step every N steps), with the last step at full depth too.
# Refreshing every 2-3 steps kept 21-25 dB on the embedded DiT at 10-12 steps; never refreshing fell to 14-19 dB.
REMAINDERS = (("taylor", 2), ("taylor", 3))
# Training-free exits for the remainders: one fixed depth, as a share of the blocks.
STATIC_FRACTIONS = (1 / 3, 1 / 2)
MARGIN_DB = 1.5  # how far a few screening samples' PSNR strays from the calibration set's, in practice
HELD_OUT_SEED = 1 << 20  # held-out batches are seeded from --seed plus this: no calibration batch shares a seed
BENCH_SEED = 1 << 21  # the bench's planner calibrates on seeds apart from the bench's own samples


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
        figures = {k: None if v is None else {"layer_ratio": v[0], "psnr": _finite(v[1])}
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
                    f"taylorseer@{s}", n) for n, w in TAYLORSEER for s in steps + [full_steps]]
    remainders = [("none", None)] + list(REMAINDERS)
    for e in exits:
        if e.steps > full_steps:
            continue
        for kind, every in remainders:
            config = dataclasses.replace(e.config, remainder=kind, refresh_every=every,
                                         refresh_last=None if kind == "none" else 1)
            key = f"{e.config.uem}:{e.min_depth}:{kind}:{every}"
            space.append(Tried(PlanSettings(e.steps, exits=config), f"{key}:{e.budget:g}", f"{key}@{e.steps}", e.budget))
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


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--psnr", type=float, required=True, metavar="DB",
                   help="the PSNR (dB) against full depth at full steps that the plan must keep")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="the plan file to write (JSON)")
    p.add_argument("--model", type=Path, metavar="DIR",
                   help="a DigitsDiTPipeline or DiTPipeline folder (default: the embedded digits DiT)")
    p.add_argument("--uem", type=Path, nargs="+", metavar="DIR",
                   help="UEM folders whose `diffexit calibrate uem` files give the exit budgets searched (default with "
                        "the embedded DiT: the shipped heads of its exit-trained backbone; otherwise none)")
    p.add_argument("--steps", type=int, default=25, help="full steps, the reference's (default: %(default)s)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the pipeline's)")
    p.add_argument("--samples", type=int, default=16, help="calibration samples (default: %(default)s)")
    p.add_argument("--screen", type=int, default=4, help="screening samples, the first calibration ones "
                                                         "(default: %(default)s)")
    p.add_argument("--held-out", type=int, default=16, help="held-out samples to check the plan (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per pipeline call (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first calibration batch (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    return p


def _check(args) -> None:
    if not (math.isfinite(args.psnr) and args.psnr > 0):
        raise ValueError(f"--psnr must be a finite number of dB > 0, such as 25; got {args.psnr}")
    for name in ("steps", "samples", "screen", "held_out", "batch_size", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.guidance_scale is not None and not (math.isfinite(args.guidance_scale) and args.guidance_scale >= 0):
        raise ValueError(f"--guidance-scale must be a finite number >= 0, got {args.guidance_scale}")
    out = args.out
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name the plan file to write, such as {out / 'plan.json'}")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: the folder {out.parent} does not exist; create it first")
    if out.exists():
        ImagePlan.load(out)  # overwrite an earlier plan, never some other file
    import os

    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"--out {out}: the folder {out.parent} is not writable; pass a path in a folder you can write")


def _uem_dirs(args) -> list[Path]:
    from ..uem.uem_folder import heads_dir

    if args.uem is not None:
        for d in args.uem:
            heads_dir(d)  # a broken folder fails now, before any sampling
        return list(args.uem)
    if args.model is not None:
        return []
    from ..uem.digits.embedded import embedded_uem_dir

    try:
        return [embedded_uem_dir(exit_trained=True)]
    except FileNotFoundError:
        return []


def main(argv: list[str], prog: str = "diffexit calibrate images") -> int:
    from .models import LoadError, class_count, default_guidance_scale, load_dit_pipeline

    args = _parser(prog).parse_args(argv)
    try:
        _check(args)
        uem_dirs = _uem_dirs(args)
        torch.set_num_threads(args.threads)
        pipe = load_dit_pipeline(args.model)
        if args.steps > pipe.scheduler.config.num_train_timesteps:
            raise ValueError(f"--steps {args.steps} is more than the {pipe.scheduler.config.num_train_timesteps} "
                             f"timesteps the pipeline's scheduler was trained with; pass fewer")
        exits = calibrated_exits(uem_dirs)
    except (LoadError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    guidance = default_guidance_scale(pipe) if args.guidance_scale is None else args.guidance_scale
    planner = Planner(pipe, full_steps=args.steps, guidance_scale=guidance, samples=args.samples,
                      screen=args.screen, batch=args.batch_size, seed=args.seed, num_classes=class_count(pipe))
    space = search_space(args.steps, num_blocks(pipe.transformer), exits)
    print(f"{prog}: {len(space)} settings against full depth at {args.steps} steps (guidance {guidance:g}); "
          f"{len(exits)} exit calibrations from {[str(d) for d in uem_dirs] or 'no UEM folder'}", file=sys.stderr)
    tried = planner.screen_all(space, [args.psnr])
    try:
        best = planner.pick(tried, args.psnr)
    except NoPlan as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    cost, quality = planner.held_out(best.settings, args.held_out)
    met = quality >= args.psnr
    figures = {"calibration": {"layer_ratio": best.calibration[0], "psnr": _finite(best.calibration[1]),
                               "samples": args.samples, "seed": args.seed},
               "held_out": {"layer_ratio": cost, "psnr": _finite(quality), "samples": args.held_out,
                            "seed": args.seed + HELD_OUT_SEED, "met": met}}
    provenance = {"command": f"{prog} {shlex.join(argv)}", "searched": len(space),
                  "screened": sum(t.screen is not None for t in tried),
                  "confirmed": sum(t.calibration is not None for t in tried), "screen_samples": planner.screen,
                  "tried": [t.to_dict() for t in tried]}
    made_for = describe_pipeline(pipe, args.steps, guidance, str(args.model.resolve()) if args.model else "embedded")
    plan = ImagePlan(best.settings, args.psnr, made_for, figures, provenance)
    plan.save(args.out)
    print(f"plan {best.settings.name}: cost {best.calibration[0]:.3f} at {best.calibration[1]:.2f} dB on "
          f"{args.samples} calibration samples")
    print(f"held-out check ({args.held_out} samples): cost {cost:.3f}, {quality:.2f} dB: target {args.psnr:g} dB "
          f"{'met' if met else 'NOT met'}")
    print(f"wrote {args.out} ({provenance['screened']} of {len(space)} settings screened, {provenance['confirmed']} "
          f"confirmed); use it with `diffexit generate images --plan {args.out}`")
    return 0


def _finite(value: float) -> Optional[float]:
    """JSON has no infinity: a PSNR of images equal to the reference is written as null."""
    return None if math.isinf(value) else value


def _skipped(reason: str):
    def build(bench):
        raise MethodSkipped(reason)

    return build


def plan_methods(bench, targets: Sequence[float], *, samples: int = 16, screen: int = 4, seed: int = 0) -> list[Method]:
    """``diffexit bench images`` rows for the planner's pick at each PSNR target (dB), searched once on
    ``samples`` calibration samples of ``bench``'s shipped pipeline (seeds apart from the bench's), with the exit
    calibrations of every set of heads on the bench. A target no setting meets gives a row skipped with the closest.

    Each row is named ``plan-<target>dB``; its family is ``composed`` when the pick joins several ways of saving
    compute (fewer steps counts as one), else that way's; ``params`` carry the target, the settings and their name.
    """
    from .models import class_count

    pipe = bench.base_pipe if bench.base_pipe is not None else bench.pipe
    planner = Planner(pipe, full_steps=bench.steps, guidance_scale=bench.guidance_scale, samples=samples,
                      screen=screen, batch=samples, seed=seed + BENCH_SEED, num_classes=class_count(pipe))
    exits = calibrated_exits([h.directory for h in bench.heads.values()])
    tried = planner.screen_all(search_space(bench.steps, bench.num_blocks, exits), targets)
    methods = []
    for target in targets:
        try:
            settings = planner.pick(tried, target).settings
        except NoPlan as e:
            methods.append(Method(f"plan-{target:g}dB", "plan", {"target_psnr": target}, _skipped(str(e))))
            continue
        techniques = settings.techniques(bench.steps)
        family = "composed" if len(techniques) > 1 else techniques[0]

        def build(bench, settings=settings) -> Session:
            run = planned_pipeline(pipe, settings, bench.guidance_scale)
            return Session(run.pipe, run.steps, exit_scheduler=run.exit_scheduler, call_context=run.call_context)

        methods.append(Method(f"plan-{target:g}dB", family, {"target_psnr": target, "plan": settings.name,
                                                             **settings.to_dict()}, build))
    return methods
