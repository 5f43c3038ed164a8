"""``diffexit calibrate images``: the cheapest sampling plan (steps x early exits x feature cache) that keeps a PSNR
target against full depth at full steps.

    diffexit calibrate images --psnr 25 --out plan.json
    diffexit generate images --plan plan.json --per-class 8 --out runs/gen-planned

The search runs on calibration samples of ``--model`` (default: the embedded digits DiT), labels round-robin over
the classes, in batches seeded ``--seed, --seed + 1, ...``. Every setting is measured against the same pipeline at
full depth and ``--steps`` steps from the same noise: ``layer_ratio`` (the cost: transformer blocks run over what the
reference runs, counted by hooks on the blocks, as ``diffexit bench images`` counts them) and ``psnr`` (dB, pixels in
[0, 1]). The settings searched (:mod:`diffexit.app.plan_search` holds the grids), never the reference itself:

- fewer steps, each alone and with diffusers' FirstBlockCache or TaylorSeer at a few settings (the caches at the full
  step count too);
- DeeDiff exits by each ``diffexit calibrate uem`` file beside the heads in ``--uem`` (an exit-error budget at the
  step count it was made for; default: the shipped heads of the exit-trained backbone), alone and with cached
  remainders (the skipped blocks add their last residual, extrapolated, with full-depth refresh steps:
  :mod:`diffexit.uem.cached_remainder`);
- training-free static exits at a third and a half of the blocks, with the same cached remainders.

The diffusers caches do not follow exits (:mod:`diffexit.app.image_plan`), so no setting joins the two.

How: every setting first runs on ``--screen`` samples, fewest steps and tightest first. Along one setting at growing
step counts, once one clears the target by a margin (3 dB) the larger ones (dearer, and no better needed) are not
run; at one step count, once a setting misses it by more than that, the looser ones of its kind (a higher cache
threshold or exit budget, a shallower exit) are not run. Those within the margin of the target then run on all
``--samples``, cheapest first, until the cheapest that meets it there is known. That plan runs on ``--held-out``
fresh samples, and the check (met or not, its cost and PSNR) is printed and recorded in the plan file
(:mod:`diffexit.app.image_plan`). No setting meeting the target is an error that names the closest.
``plan_methods`` gives ``diffexit bench images`` the picks as rows.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

import torch

from ..common.cli_help import HelpFormatter
from ..uem.block_adapters import num_blocks
from .bench.image_methods import Method, MethodSkipped, Session
from .image_plan import ImagePlan, describe_pipeline, planned_pipeline
from .plan_search import HELD_OUT_SEED, NoPlan, Planner, calibrated_exits, finite, search_space

BENCH_SEED = 1 << 21  # the bench's planner calibrates on seeds apart from the bench's own samples


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
    figures = {"calibration": {"layer_ratio": best.calibration[0], "psnr": finite(best.calibration[1]),
                               "samples": args.samples, "seed": args.seed},
               "held_out": {"layer_ratio": cost, "psnr": finite(quality), "samples": args.held_out,
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


def _skipped(reason: str):
    def build(bench):
        raise MethodSkipped(reason)

    return build


def plan_name(target: float) -> str:
    """The bench row of the planner's pick at PSNR ``target`` (dB)."""
    return f"plan-{target:g}dB"


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
            methods.append(Method(plan_name(target), "plan", {"target_psnr": target}, _skipped(str(e))))
            continue
        techniques = settings.techniques(bench.steps)
        family = "composed" if len(techniques) > 1 else techniques[0]

        def build(bench, settings=settings) -> Session:
            run = planned_pipeline(pipe, settings, bench.guidance_scale)
            return Session(run.pipe, run.steps, exit_scheduler=run.exit_scheduler, call_context=run.call_context)

        methods.append(Method(plan_name(target), family, {"target_psnr": target, "plan": settings.name,
                                                             **settings.to_dict()}, build))
    return methods
