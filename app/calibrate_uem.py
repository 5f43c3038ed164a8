"""``diffexit calibrate uem``: per-step exit thresholds, and minimum depths, that keep the exit error within a budget.

Records full-depth sampling runs of ``--model`` (default: the embedded digits DiT) with every exit of the UEMs in
``--uem``, then, per budget, picks each step's rule (:mod:`diffexit.uem.calibration` has the method and the units)
and saves it beside the UEMs (or in ``--out``) as ``calibration-<budget>.json``, with ``-steps<N>`` before
``.json`` for a step count other than 25 (:mod:`diffexit.uem.calibration_file`). ``diffexit generate images --method
deediff --budget B``, the demo and ``diffexit bench images`` read those files; a file holds only for the sampler,
steps and guidance it was made with.

``--statistic change`` calibrates MuE's training-free similarity exits instead
(:func:`~diffexit.uem.calibration.calibrate_similarity`): per-step tolerances on the relative change each block makes,
with no heads, so it takes no ``--uem`` and needs ``--out``; use a file with ``diffexit generate images --method
similarity --calibration FILE``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional

import torch

from ..common.cli_help import HelpFormatter
from ..uem.calibration import calibrate, calibrate_similarity, record_exits
from ..uem.calibration_file import CALIBRATION_STEPS, Calibration, calibration_path, weights_digest
from ..uem.heads import describe_model
from .models import class_count, default_guidance_scale, load_dit_pipeline, load_uem, with_backbone

DEFAULT_STEPS = CALIBRATION_STEPS  # the step count of a calibration named by its budget alone


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--uem", help="directory of the UEM weights (UEMStack.save_pretrained); the calibrations are "
                                 "saved there unless --out says otherwise")
    p.add_argument("--statistic", choices=("uncertainty", "change"), default="uncertainty",
                   help="what exits read: the UEMs' uncertainty (DeeDiff, default) or the relative change a block "
                        "makes (similarity exits: no --uem, give --out)")
    p.add_argument("--budget", type=float, nargs="+", required=True,
                   help="bound(s) on the mean exit error per step, in the sampler's state units (pixels in [-1, 1] "
                        "for the digits DiT); one file per budget")
    p.add_argument("--model", default=None,
                   help="a DiT pipeline directory, or a bare DiTTransformer2DModel directory (sampled with the "
                        "embedded pipeline's scheduler); default: the embedded digits DiT")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help="sampling steps, as the pipeline will use them (default: %(default)s)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance weight (default: the pipeline's default)")
    p.add_argument("--min-depth", nargs="+", default=["auto"],
                   help="'auto': choose a minimum depth per step along with the threshold; N >= 1: a fixed minimum "
                        "at every step (1: none). Several values calibrate each from the same recording")
    p.add_argument("--samples", type=int, default=128, help="calibration samples (digit labels round-robin)")
    p.add_argument("--held-out", type=int, default=128, help="held-out samples measured with the chosen rules")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="noise seed of the calibration samples (held out: seed + 1)")
    p.add_argument("--out", default=None,
                   help="directory for the calibration files (default: --uem); files saved elsewhere are used with "
                        "generate images --calibration FILE")
    return p


def _check_args(args) -> list[Optional[int]]:
    """Validate the arguments; return the minimum-depth modes (an int for a fixed depth, None for 'auto')."""
    for name in ("steps", "samples", "held_out", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    bad = [b for b in args.budget if not b > 0]
    if bad:
        raise ValueError(f"--budget must be > 0, got {bad[0]}")
    if args.statistic == "change" and (args.uem is not None or args.out is None):
        raise ValueError("--statistic change calibrates similarity exits, which read no heads: drop --uem and give "
                         "--out DIR for the files" if args.uem is not None else
                         "--statistic change needs --out DIR: similarity exits have no UEM folder to save beside")
    if args.statistic == "uncertainty" and args.uem is None:
        raise ValueError("--uem DIR is required: the UEM heads whose uncertainty is calibrated (or --statistic change "
                         "for similarity exits, which need none)")
    if args.guidance_scale is not None and args.guidance_scale < 0:
        raise ValueError(f"--guidance-scale must be >= 0, got {args.guidance_scale}")
    modes = []
    for value in args.min_depth:
        if value == "auto":
            modes.append(None)
            continue
        try:
            fixed = int(value)
        except ValueError:
            raise ValueError(f"--min-depth must be 'auto' or an int >= 1, got {value!r}") from None
        if fixed < 1:
            raise ValueError(f"--min-depth must be 'auto' or an int >= 1, got {fixed}")
        modes.append(fixed)
    return list(dict.fromkeys(modes))


TABLE_HEAD = ("| min depth | budget | layer ratio (cal) | layer ratio (held out) | mean error (held out) | "
              "worst step (held out) | file |\n|---|---|---|---|---|---|---|")


def _report(calibration: Calibration, path: Path) -> None:
    """One table row: a saved calibration's figures and file."""
    cal, held = calibration.figures["calibration"], calibration.figures["held_out"]
    mean_err = sum(held["error_per_step"]) / len(held["error_per_step"])
    print(f"| {calibration.provenance['min_depth']} | {calibration.budget:g} | {cal['layer_ratio']:.3f} | "
          f"{held['layer_ratio']:.3f} | {mean_err:.5f} | {held['max_error']:.5f} | {path} |")


def _similarity(args, argv: list[str], prog: str, pipe, modes: list[Optional[int]]) -> int:
    """``--statistic change``: similarity-exit tolerances per budget and minimum-depth mode, saved in ``--out``."""
    guidance = default_guidance_scale(pipe) if args.guidance_scale is None else args.guidance_scale
    num_classes = class_count(pipe)
    print(f"{prog}: recording {args.samples} calibration and {args.held_out} held-out samples at full depth "
          f"({args.steps} steps, guidance {guidance:g}, {type(pipe.scheduler).__name__}), similarity exits",
          file=sys.stderr)
    print(TABLE_HEAD)
    for mode in modes:
        made = calibrate_similarity(pipe.transformer, pipe.scheduler, torch.arange(args.samples) % num_classes,
                                    torch.arange(args.held_out) % num_classes, budgets=sorted(args.budget),
                                    steps=args.steps, guidance_scale=guidance, seed=args.seed, min_depth=mode)
        for calibration in made:
            calibration.model["path"] = str(args.model or "embedded")
            calibration.provenance["command"] = f"{prog} {shlex.join(argv)}"
            _report(calibration, calibration.save(calibration_path(args.out, calibration.budget, mode, args.steps)))
    print(f"{prog}: use a file with `diffexit generate images --method similarity --calibration FILE`")
    return 0


def main(argv: list[str], prog: str = "diffexit calibrate uem") -> int:
    parser = _parser(prog)
    args = parser.parse_args(argv)
    try:
        modes = _check_args(args)
        pipe = load_dit_pipeline(Path(args.model) if args.model else None)
        if args.statistic == "change":
            return _similarity(args, argv, prog, pipe, modes)
        uem, tuned, heads = load_uem(Path(args.uem))
        # Heads trained with a fine-tuned backbone are calibrated on it (the pipeline keeps its scheduler).
        pipe = with_backbone(pipe, tuned)
        transformer, scheduler = pipe.transformer, pipe.scheduler
        uem.check_matches(transformer)
        blocks = uem.config.num_blocks
        deepest = max((m for m in modes if m is not None), default=0)
        if deepest > blocks:
            raise ValueError(f"--min-depth {deepest} exceeds the model's {blocks} blocks")
    except (OSError, ValueError) as err:
        parser.error(str(err))
    guidance = default_guidance_scale(pipe) if args.guidance_scale is None else args.guidance_scale
    device = "cuda" if torch.cuda.is_available() else "cpu"
    transformer.to(device)
    uem.to(device)

    num_classes = class_count(pipe)

    def labels(n):
        return torch.arange(n) % num_classes

    kw = dict(steps=args.steps, guidance_scale=guidance, batch_size=args.batch_size)
    print(f"{prog}: recording {args.samples} calibration and {args.held_out} held-out samples at full depth "
          f"({args.steps} steps, guidance {guidance:g}, {type(scheduler).__name__})", file=sys.stderr)
    record = record_exits(transformer, uem, scheduler, labels(args.samples), seed=args.seed, **kw)
    held_out = record_exits(transformer, uem, scheduler, labels(args.held_out), seed=args.seed + 1, **kw)

    model = {**describe_model(transformer), "weights_sha256": weights_digest(transformer),
             "path": str(args.model or "embedded")}
    uem_info = {"target": uem.config.target, "weights_sha256": weights_digest(uem), "path": str(heads)}
    sampler = {"scheduler": type(scheduler).__name__, "steps": args.steps, "guidance_scale": guidance}
    out_dir = Path(args.out) if args.out else heads
    print(TABLE_HEAD)
    for mode in modes:
        provenance = {"command": f"{prog} {shlex.join(argv)}", "seed": args.seed, "samples": args.samples,
                      "held_out": args.held_out, "min_depth": "auto" if mode is None else mode}
        for r in calibrate(record, sorted(args.budget), mode, held_out):
            calibration = Calibration(r["budget"], r["thresholds"], r["min_depths"], model, uem_info, sampler,
                                      r["figures"], provenance)
            _report(calibration, calibration.save(calibration_path(out_dir, r["budget"], mode, args.steps)))
    if out_dir.resolve() != Path(heads).resolve():
        # --budget finds only files beside the UEMs; these are elsewhere, so say how to use them.
        print(f"{prog}: the files are in {out_dir}, not beside the UEMs: use one with `diffexit generate images "
              f"--uem {args.uem} --calibration FILE` (or copy it to {heads} to name it by --budget)")
    return 0
