"""``diffexit generate images``: class-conditional images from a DiT pipeline, at full depth or with early exits.

    diffexit generate images --per-class 8 --out runs/gen-full
    diffexit generate images --per-class 8 --classes 0 3 7 --method static --depths 4 8 12 --out runs/gen-static
    diffexit generate images --per-class 8 --method deediff --budget 0.02 --steps 25 --out runs/gen-calibrated
    diffexit generate images --requests requests.jsonl --method deediff --threshold linear:0.3:0.05 \\
        --uem runs/uem/uem --out runs/gen-deediff --compare-full
    diffexit generate images --per-class 8 --plan plan.json --out runs/gen-planned --compare-full

Inputs: ``--per-class N`` images of every class (or of ``--classes``), with ids ``c<class>-<k>``; or
``--requests FILE``, a JSONL of ``{"id": ..., "class": ..., "seed": ...}`` (``id`` and ``seed`` optional: the id
defaults to ``line<number>``). An item's seed is its own ``seed``, or else is derived from ``--seed`` and its id,
and its noise comes from its own CPU generator, so what an image is drawn from depends on neither the batch nor the
process that draws it. Its pixels can still move by one 8-bit level with ``--batch-size``: float32 matrix products
sum in an order the kernels choose by the number of rows, so one sample's output at batch 1 and at batch 4 differ
by about 1e-6 (2e-6 at most, measured on 8 digits of the embedded DiT at 25 steps), and a pixel that close to a
rounding boundary lands on the neighbouring level of its PNG (1/255; a few pixels in some images). Under DeeDiff
exits a sample whose uncertainty lies within that error of its threshold can also exit at the next block. Under a
plan with FirstBlockCache, images do depend on the batch: the cache skips the remaining blocks for a whole call at
once, when the first block's output changed little over the batch's rows together, so other images in a batch change
which steps skip. The same ``--batch-size`` gives bit-identical files on any number of processes.

Methods (``--method``, or ``"method"`` in ``--config FILE`` with the parameters beside it; flags override the file):

- ``full``: the pipeline as it is.
- ``deediff``: DeeDiff early exits: a sample leaves the block loop once its mean UEM uncertainty falls below
  ``threshold`` (a number, ``KIND:HIGH:LOW[:K]`` or a ``ThresholdSchedule`` object over sampling progress), never
  before ``min_depth`` blocks if given; or, with ``budget`` instead of ``threshold``, the per-step thresholds and
  minimum depths ``diffexit calibrate uem --budget B`` saved beside the UEMs (``calibration-B.json``, which must
  match the model, the steps, the sampler and the guidance scale). Reads the shipped heads on the embedded
  pipeline; with ``--pipeline``, give ``--uem DIR``, the ``uem/`` folder ``diffexit train uem`` writes.
- ``static``: a fixed depth per stretch of sampling, ``depths`` (e.g. ``4 8 12`` by thirds); no UEM.
- ``similarity``: MuE's training-free exits: a sample leaves after the first block that changed its hidden state by
  less than ``tolerance`` of it (never before ``min_depth``), or by the per-step tolerances of a ``calibration`` file
  from ``diffexit calibrate uem --statistic change``; no UEM.

With an exit method, ``--remainder`` and its refresh flags compose the exits with a cached remainder
(:mod:`diffexit.uem.cached_remainder`); refused on ``full`` or without a remainder; ``job.json`` records them.

``--plan FILE`` instead of a method: the steps, exits and feature cache ``diffexit calibrate images`` chose for a PSNR
target (:mod:`diffexit.app.image_plan`). A plan holds only for the pipeline class, weights and guidance it was made
for; ``--steps`` with a plan names the full step count it was planned against (the plan itself fixes the steps it
samples), and ``--compare-full`` then runs full depth at those full steps.

Outputs in ``--out``: ``<id>.png`` per item and ``manifest.jsonl`` with one record per item in input order: ``id``,
``class``, ``seed``, ``method``, ``file``, ``layers`` (blocks run, summed over steps), ``layer_ratio``, ``depths``
(blocks run at each step) and ``seconds`` (its share of its batch's time). ``--compare-full`` also makes the full-depth
images in ``OUT/full`` and reports the speedup. Resumable and ready for ``accelerate launch``: see
:mod:`diffexit.app.jobs`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..common.cli_help import HelpFormatter
from ..uem.block_adapters import num_blocks
from ..uem.exit_config import REMAINDER_FIELDS, REMAINDERS, EarlyExitConfig
from ..uem.rule_spec import METHODS, PARAMS
from .job_inputs import Item, JobError, check_item_id, check_keys, item_seed, make_job, read_config, read_jsonl
from .jobs import (
    JobResult,
    check_job,
    describe_run,
    job_spec,
    lock_out_dir,
    prepare_out_dir,
    process_state,
    run_job,
    wall_speedup,
)

MANIFEST = "manifest.jsonl"
FULL_DIR = "full"
DEFAULT_STEPS = 25


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--per-class", type=int, metavar="N", help="N images of each class")
    src.add_argument("--requests", type=Path, metavar="FILE", help="JSONL of {id?, class, seed?} requests")
    p.add_argument("--classes", type=int, nargs="+", metavar="C", help="with --per-class: these classes (default: all)")
    p.add_argument("--seed", type=int, default=0, help="base of the per-item seeds (default: %(default)s)")
    p.add_argument("--method", choices=METHODS, help="full (default), deediff, static or similarity")
    p.add_argument("--threshold", metavar="T", help="deediff: a number in [0, 1] or KIND:HIGH:LOW[:K]")
    p.add_argument("--min-depth", type=int, metavar="N", help="deediff: never exit before N blocks")
    p.add_argument("--budget", type=float, metavar="B",
                   help="deediff, instead of --threshold: the per-step thresholds `diffexit calibrate uem --budget B` "
                        "saved beside the UEMs (calibration-B.json)")
    p.add_argument("--calibration", type=Path, metavar="FILE",
                   help="deediff, instead of --threshold or --budget: a calibration file made by `diffexit calibrate "
                        "uem` (e.g. one it wrote to its --out)")
    p.add_argument("--depths", type=int, nargs="+", metavar="D", help="static: blocks per stretch of sampling")
    p.add_argument("--tolerance", metavar="T", help="similarity: exit once a block changes the hidden state by less "
                                                   "than this share (a number in [0, 1] or KIND:HIGH:LOW[:K])")
    p.add_argument("--remainder", choices=REMAINDERS,
                   help="deediff, static, similarity: what the blocks a sample skipped add: none (default), cached "
                        "(their last residual) or taylor (extrapolated from their last two)")
    p.add_argument("--refresh-every", type=int, metavar="N", help="with --remainder: every N-th step runs full depth")
    p.add_argument("--refresh-last", type=int, metavar="M", help="with --remainder: the last M steps run full depth")
    p.add_argument("--refresh-first", type=int, metavar="K", help="with --remainder: the first K run full (default 1)")
    p.add_argument("--exit-every", type=int, metavar="E",
                   help="with --remainder: the exit rule runs at one step in E and the steps between run no block")
    p.add_argument("--plan", type=Path, metavar="FILE",
                   help="instead of a method: a plan file `diffexit calibrate images` wrote (its steps, exits, cache)")
    p.add_argument("--config", type=Path, metavar="FILE", help='JSON {"method": ..., parameters...}')
    p.add_argument("--pipeline", type=Path, metavar="DIR",
                   help="a DigitsDiTPipeline or DiTPipeline folder (default: the embedded digits DiT)")
    p.add_argument("--uem", type=Path, metavar="DIR",
                   help="deediff: the UEM folder (UEMStack.save_pretrained, or a `diffexit train uem --out` run); "
                        "default with the embedded pipeline: the shipped heads")
    p.add_argument("--steps", type=int,
                   help=f"denoising steps (default: a calibration's own, else {DEFAULT_STEPS}); with --plan, the full "
                        f"steps it was planned against (checked)")
    p.add_argument("--guidance-scale", type=float,
                   help="classifier-free guidance (default: a calibration's own, else the pipeline's)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch in a process (default: %(default)s)")
    p.add_argument("--compare-full", action="store_true", help="also run full depth into OUT/full; report the speedup")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="output folder (resumed if it holds this job)")
    return p


def resolve_config(args) -> EarlyExitConfig:
    """The run's :class:`~diffexit.uem.exit_config.EarlyExitConfig` from ``--config`` and the flags (flags win),
    with the UEM folder (``--uem``, or the shipped heads on the embedded pipeline) as an absolute path."""
    config = read_config(args.config) if args.config else {}
    if config:
        check_keys(config, ("method",) + tuple(dict.fromkeys(k for v in PARAMS.values() for k in v))
                   + REMAINDER_FIELDS, f"config file {args.config}")
    method = args.method or config.get("method", "full")
    params = {k: v for k, v in config.items() if k != "method"}
    flags = {"threshold": args.threshold, "min_depth": args.min_depth, "depths": args.depths, "budget": args.budget,
             "calibration": args.calibration, "tolerance": args.tolerance,
             **{k: getattr(args, k) for k in REMAINDER_FIELDS}}
    params.update({k: v for k, v in flags.items() if v is not None})
    uem = args.uem
    if method == "deediff" and uem is None:
        if args.pipeline is not None:
            raise JobError("method 'deediff' reads the uncertainty heads: pass --uem DIR (the uem/ folder that "
                           "`diffexit train uem` writes) for this pipeline's transformer")
        from ..uem.digits.embedded import embedded_uem_dir

        try:
            uem = embedded_uem_dir()
        except FileNotFoundError as e:
            raise JobError(str(e)) from None
    if method != "deediff" and uem is not None:
        raise JobError(f"--uem only applies to method 'deediff', not {method!r}")
    try:
        return EarlyExitConfig(method, **params, uem=None if uem is None else str(Path(uem).resolve()))
    except ValueError as e:
        raise JobError(str(e) if str(e).startswith(("unknown method", "method ")) or " parameter " in str(e)
                       else f"method {method!r}: {e}") from e


def read_plan(args):
    """The :class:`~diffexit.app.image_plan.ImagePlan` that ``--plan`` names; a method's flags beside it are refused."""
    from .image_plan import ImagePlan

    exit_flags = ("method", "threshold", "min_depth", "budget", "calibration", "depths", "tolerance",
                  *REMAINDER_FIELDS, "config", "uem")
    given = [f"--{name.replace('_', '-')}" for name in exit_flags if getattr(args, name) is not None]
    if given:
        raise JobError(f"--plan fixes the steps, exits and cache; drop {given[0]} (or drop --plan)")
    try:
        return ImagePlan.load(args.plan)
    except ValueError as e:
        raise JobError(str(e)) from None


def per_class_items(classes: Sequence[int], per_class: int, base_seed: int) -> list[Item]:
    """``per_class`` items of each class, ids ``c<class>-<k:04d>``, in class order."""
    if per_class < 1:
        raise JobError(f"--per-class must be at least 1, got {per_class}")
    items = []
    for c in classes:
        for k in range(per_class):
            item_id = f"c{c}-{k:04d}"
            items.append(Item(item_id, item_seed(item_id, base_seed), {"class": c}, source=f"--classes {c}"))
    return items


def read_requests(path: Path, base_seed: int) -> list[Item]:
    """Items from a JSONL of ``{"id"?, "class", "seed"?}``; a bad line raises, naming its number."""
    items = []
    for number, row in read_jsonl(path):
        where = f"{path} line {number}"
        check_keys(row, ("id", "class", "seed"), where)
        if "class" not in row:
            raise JobError(f"{where}: missing 'class'")
        label = row["class"]
        if isinstance(label, bool) or not isinstance(label, int):
            raise JobError(f"{where}: class must be a class id, a whole number such as 3, got {label!r}")
        item_id = check_item_id(row.get("id", f"line{number:05d}"), where)
        seed = row.get("seed", item_seed(item_id, base_seed))
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise JobError(f"{where}: seed must be an integer in [0, 2**63), got {seed!r}")
        items.append(Item(item_id, seed, {"class": label}, source=where))
    return items


def png_bytes(image) -> bytes:
    """One image, float ``[H, W, C]`` in [0, 1] with ``C`` 1 or 3, as PNG bytes (grey or RGB, 8 bits)."""
    import numpy as np
    from PIL import Image

    pixels = (np.asarray(image) * 255).round().clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class ImageEngine:
    """Draws a batch of items with one pipeline call; records the depth each sample ran at each step. With a
    :class:`~diffexit.app.image_plan.PlanRun` (``planned``), calls run in its context and it reports the depths."""

    def __init__(self, pipe, method: str, steps: int, guidance_scale: float, planned=None):
        self.pipe, self.method, self.steps, self.guidance_scale = pipe, method, steps, guidance_scale
        self.planned = planned
        self.num_blocks = num_blocks(pipe.transformer)

    def files(self, item: Item) -> list[str]:
        return [f"{item.id}.png"]

    def run(self, items: Sequence[Item]) -> list[tuple[dict, dict[str, bytes]]]:
        import torch

        from ..samplers.exit_scheduler import ExitAwareScheduler

        # One CPU generator per item: its noise is the same on any device and in any batch.
        generators = [torch.Generator().manual_seed(item.seed) for item in items]
        with contextlib.nullcontext() if self.planned is None else self.planned.call_context():
            images = self.pipe([item.payload["class"] for item in items], guidance_scale=self.guidance_scale,
                               generator=generators, num_inference_steps=self.steps, output_type="np").images
        if self.planned is not None:
            depths = self.planned.depths(len(items))
        elif isinstance(self.pipe.scheduler, ExitAwareScheduler):
            depths = self.pipe.scheduler.statistics.depths.T.tolist()
        else:
            depths = [[self.num_blocks] * len(self.pipe.scheduler.timesteps)] * len(items)
        out = []
        for item, image, used in zip(items, images, depths):
            name = f"{item.id}.png"
            record = {"id": item.id, "class": item.payload["class"], "seed": item.seed, "method": self.method,
                      "file": name, "layers": sum(used), "layer_ratio": sum(used) / (self.num_blocks * len(used)),
                      "depths": used}
            out.append((record, {name: png_bytes(image)}))
        return out


def _pipeline_id(path: Optional[Path]) -> str:
    return "embedded" if path is None else str(Path(path).resolve())


def run(argv: Sequence[str], prog: str = "diffexit generate images") -> tuple[JobResult, Optional[JobResult]]:
    """Parse ``argv``, generate, print the summary on the main process; returns the method's and full depth's
    :class:`~diffexit.app.jobs.JobResult` (None without ``--compare-full``). Bad input raises :class:`JobError`."""
    from ..uem.uem_folder import heads_dir

    args = _parser(prog).parse_args(list(argv))
    if args.classes is not None and args.per_class is None:
        raise JobError("--classes goes with --per-class; a --requests file names each request's class")
    if args.steps is not None and args.steps < 1:
        raise JobError(f"--steps must be a positive whole number of denoising steps, got {args.steps}")
    if args.batch_size < 1:
        raise JobError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.guidance_scale is not None and not (math.isfinite(args.guidance_scale) and args.guidance_scale >= 0):
        raise JobError(f"--guidance-scale must be a finite number >= 0, got {args.guidance_scale} (1 or below turns "
                       f"guidance off)")
    plan = read_plan(args) if args.plan is not None else None
    config = plan.settings.exits if plan is not None else resolve_config(args)
    if config.uem is not None:
        try:
            heads_dir(config.uem)  # a broken folder fails now, not after the pipeline has loaded
        except ValueError as e:
            raise JobError(str(e)) from None
    items = read_requests(args.requests, args.seed) if args.requests else None
    out = prepare_out_dir(args.out)

    state = process_state()
    # Held from before the model loads: a folder another job is writing is refused before that work.
    with lock_out_dir(out, state):
        return _generate(args, out, state, config, items, plan)


def _generate(args, out: Path, state, config: EarlyExitConfig, items: Optional[list[Item]],
              plan=None) -> tuple[JobResult, Optional[JobResult]]:
    """:func:`run`'s work once the inputs are checked and the folder is locked; ``items`` is None for
    ``--per-class``, whose classes are known once the pipeline is; ``plan`` is ``--plan``'s."""
    from ..samplers.early_exits import attach_early_exits
    from ..uem.exit_rules import FullDepth
    from .image_plan import planned_pipeline
    from .models import LoadError, class_count, default_guidance_scale, load_dit_pipeline

    method = "plan" if plan is not None else config.method
    try:
        pipe = load_dit_pipeline(args.pipeline, state.device)
    except LoadError as e:
        raise JobError(str(e)) from None
    n_classes = class_count(pipe)
    if items is None:
        classes = args.classes if args.classes is not None else list(range(n_classes))
        bad = [c for c in classes if not 0 <= c < n_classes]
        if bad:
            raise JobError(f"unknown class {bad[0]} in --classes; this model draws classes 0..{n_classes - 1}")
        items = per_class_items(classes, args.per_class, args.seed)
    for item in items:
        if not 0 <= item.payload["class"] < n_classes:
            raise JobError(f"{item.source}: unknown class {item.payload['class']}; this model draws classes "
                           f"0..{n_classes - 1}")
    steps, guidance, exits, planned = args.steps, args.guidance_scale, None, None
    if plan is not None:
        try:
            plan.check(pipe, full_steps=steps, guidance_scale=guidance)
            guidance = plan.made_for["guidance_scale"]
            planned = planned_pipeline(pipe, plan.settings, guidance)
        except ValueError as e:
            raise JobError(f"{args.plan}: {e}") from None
        steps = plan.settings.steps
        if not plan.met:
            print(f"warning: {args.plan} did not meet its {plan.target_psnr:g} dB target on its held-out check",
                  file=sys.stderr)
    elif method != "full":
        try:
            # Heads trained with a fine-tuned backbone (diffexit train uem --mode full) sample with it.
            exits = attach_early_exits(pipe, config, steps=steps, guidance_scale=guidance)
        except ValueError as e:
            raise JobError(str(e)) from None
        steps, guidance = exits.steps, exits.guidance_scale
    steps = DEFAULT_STEPS if steps is None else steps
    guidance = default_guidance_scale(pipe) if guidance is None else guidance
    most = pipe.scheduler.config.num_train_timesteps
    if steps > most:
        raise JobError(f"--steps {steps} is more than the {most} timesteps the pipeline's scheduler was trained "
                       f"with; pass --steps {most} or fewer")

    job = make_job(items, args.batch_size)
    settings = {"command": "generate images", "pipeline": _pipeline_id(args.pipeline), "steps": steps,
                "guidance_scale": guidance, "batch_size": args.batch_size}
    planned_for = {} if plan is None else {"plan": {**plan.settings.to_dict(), "target_psnr": plan.target_psnr,
                                                    "weights_sha256": plan.made_for["weights_sha256"]}}
    spec = job_spec({**settings, "exits": config.to_dict(), **planned_for}, job)
    # A plan is compared with the full depth it was planned against: its full steps.
    full_steps = steps if plan is None else plan.made_for["full_steps"]
    full_spec = job_spec({**settings, "steps": full_steps, "exits": EarlyExitConfig("full").to_dict()}, job)
    compare = args.compare_full and method != "full"
    check_job(out, spec)
    if compare:
        check_job(out / FULL_DIR, full_spec)

    engine = (ImageEngine(pipe, method, steps, guidance) if planned is None else
              ImageEngine(planned.pipe, method, steps, guidance, planned))
    result = run_job(out, spec, job, engine, manifest=MANIFEST, desc=f"images ({method})", state=state)
    full = None
    if compare:
        if exits is not None:
            # Full depth through the same hook runs the model's own forward, on the backbone the exits used.
            exits.early_exit.rule = FullDepth()
        full_out = prepare_out_dir(out / FULL_DIR)
        # A plan ran on a copy: the pipeline itself is the model as the user runs it.
        full = run_job(full_out, full_spec, job, ImageEngine(pipe, "full", full_steps, guidance), manifest=MANIFEST,
                       desc="images (full)", state=state)
    if state.is_main_process:
        print(describe_run(result, f"generate images ({method})"))
        # Every item runs the same steps on the same blocks, so the mean of the ratios is the overall ratio.
        ratio = sum(r["layer_ratio"] for r in result.records) / len(result.records)
        print(f"layer ratio {ratio:.3f} (blocks run / blocks available, over all {result.items} items)")
        if plan is not None:
            held = plan.figures["held_out"]
            quality = "identical images" if held["psnr"] is None else f"{held['psnr']:.2f} dB"
            print(f"plan {plan.settings.name}: cost {ratio * steps / full_steps:.3f} against full depth at "
                  f"{full_steps} steps (its held-out check: {held['layer_ratio']:.3f} at {quality}, target "
                  f"{plan.target_psnr:g} dB {'met' if held['met'] else 'NOT met'})")
        if args.compare_full and method == "full":
            print("--compare-full: the method is full depth already; nothing to compare")
        if full is not None:
            print(describe_run(full, "full depth"))
            # A plan's cost counts the steps it leaves out too: blocks run over full depth at its full steps.
            cost = f"layer ratio {ratio:.3f}" if plan is None else f"cost {ratio * steps / full_steps:.3f}"
            print(f"speedup over full depth: {wall_speedup(full.records, result.records):.2f}x wall clock "
                  f"(per-item seconds summed over the same {result.items} items), at {cost}")
    return result, full


def main(argv: list[str], prog: str = "diffexit generate images") -> int:
    try:
        run(argv, prog)
    except JobError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
