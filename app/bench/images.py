"""``diffexit bench images``: DeeDiff early exits against full depth, static depth schedules, MuE's similarity exits,
fewer sampling steps and diffusers' FirstBlockCache, TaylorSeer and MagCache, alone and composed, side by side on the
embedded digits DiT, on one cost axis.

Every method draws the same digits (``--per-class`` of each class, in batches seeded ``seed, seed + 1, ...``) from
the same initial noise, with the pipeline's default guidance scale, so every image has a full-depth twin. Per method:

- ``layer_ratio``, the cost: transformer blocks run over what full depth at the full ``--steps`` runs on the same
  samples. Hooks on the blocks count image rows per block call, so rows that exited early, steps not taken and
  blocks FirstBlockCache skipped all count as not run: one axis for depth and steps.
- ``speedup_wall_b1``, ``speedup_wall_b16``: full depth's wall-clock over the method's, generating one image per
  call and 16 per call. All methods, full depth among them, are timed interleaved (round-robin, ``--rounds``
  repeats, :mod:`~diffexit.app.bench.timing`); the figure is full depth's median over the method's, beside each
  median (``seconds_b1``, ``seconds_b16``) and its spread (slowest minus fastest repeat). ``noisy`` flags a row
  whose batch-16 wall speedup lies outside 0.5-1.5x its cost's reciprocal.
- ``psnr`` (dB): of the mean squared error against the reference images from the same noise, pixels in [0, 1]:
  the user's model, that is the pipeline as shipped at full depth and full steps (``full-base`` when the UEM folder
  brings a fine-tuned backbone, else ``full``); null where the images are bit-identical to it
  (``identical_to_full``).
- ``class_agreement``: the fraction the digits classifier reads as the requested digit.
- ``frechet``: Frechet distance of the classifier's features against the 300 held-out real digits, and
  ``frechet_std``, its spread: the standard deviation over bootstrap resamples of the generated digits.

The rows (:func:`~diffexit.app.bench.image_methods.image_methods`): full depth; DeeDiff per UEM target at constant
thresholds and schedules, and with each calibration file beside the heads at the step count it was made for (DeeDiff
composed with fewer steps); static depth schedules, shallow first, deep first, DuoDiff's shallow-then-full switch
and one fixed depth; MuE's similarity exits (constant tolerances, and tolerances calibrated on this backbone); fewer
steps; diffusers' FirstBlockCache, TaylorSeer and MagCache (:mod:`~diffexit.app.bench.image_caches`) at several
settings; and the ``composed`` rows, named by their techniques joined with ``+``: exits whose skipped blocks add a
cached remainder (:mod:`diffexit.uem.cached_remainder`) with fewer steps, and TaylorSeer's step skipping with exits
on the steps that compute. DeeDiff does not compose with FirstBlockCache: FirstBlockCache caches the residual of the
last block over the whole batch, and rows that exited never reach the last block.

The goal of #28 (:mod:`~diffexit.app.bench.image_goals`) is checked on the rows and printed after the table.

When the UEM folder holds a fine-tuned backbone (``diffexit train uem --mode full`` trains one), every method runs on
that backbone, so they all differ only in how they save compute, and ``full-base`` is the backbone the pipeline
shipped with: the reference that PSNR is measured against.

Writes ``DIR/results.json`` (with the goal's figures under ``goals``), ``DIR/pareto.png`` (PSNR and class agreement
against cost for every family, class agreement against wall-clock), ``DIR/samples.png`` (full depth next to the early-exit methods), ``DIR/exit_depths.png`` (share of
samples exiting at each depth, per sampling step; when a row exits), appends the run's headline figures (each row's
cost, PSNR and batch-16 wall speedup, and the goal) to ``DIR/history.jsonl`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from ...common.cli_help import HelpFormatter
from ...common.results import markdown_table, write_results
from ...uem.digits.classifier import class_agreement, extract_features, frechet_distance, load_classifier
from ...uem.digits.data import load_digits_dataset
from ...uem.digits.files import CLASSIFIER_DIR, DIT_DIR, EXITS_DIR, UEM_DIR
from ...uem.image_quality import psnr
from ..calibrate_images import plan_methods, plan_name
from .history import append_history, history_line
from .image_goals import LEVELS, goals_block
from .image_methods import Bench, Heads, Method, image_methods
from .image_plots import plot_exit_depths, plot_pareto, plot_samples
from .image_runs import B16, Quality, run_methods
from .rows import RowId, bench_row
from .timing import REPEATS, is_noisy

FIGURES = ("layer_ratio", "speedup_wall_b1", "speedup_wall_b16", "psnr", "class_agreement", "frechet", "frechet_std")
COLUMNS = [("method", "method", ""), ("layer_ratio", "cost", ".3f"), ("speedup_wall_b1", "speedup b1", ".2f"),
           ("speedup_wall_b16", "speedup b16", ".2f"), ("psnr", "PSNR dB", ".1f"),
           ("class_agreement", "class agr.", ".3f"), ("frechet", "Frechet", ".1f"), ("frechet_std", "+-", ".1f")]
BOOTSTRAP = 20  # resamples for the Frechet distance's spread


def _row(method: Method, **figures) -> dict:
    return bench_row(RowId(method.name, method.family, method.params), **{k: figures.get(k) for k in FIGURES},
                     **{k: v for k, v in figures.items() if k not in FIGURES})


def frechet_spread(features: torch.Tensor, real_features: torch.Tensor, seed: int) -> float:
    """Standard deviation of the Frechet distance over :data:`BOOTSTRAP` resamples (with replacement) of
    ``features`` ``[N, D]``."""
    gen = torch.Generator().manual_seed(seed)
    n = features.shape[0]
    values = [frechet_distance(features[torch.randint(n, (n,), generator=gen)], real_features)
              for _ in range(BOOTSTRAP)]
    return float(torch.tensor(values).std())


def figures_row(method: Method, got, full: Quality, reference: Quality, timing: Optional[dict], labels: torch.Tensor,
                classifier, real_features: torch.Tensor) -> dict:
    """The results.json row of ``method``: its figures, or the reason it was skipped (``got`` is then a string).

    ``full`` is full depth of the backbone the methods run on (the cost and timing reference); ``reference`` the
    user's model at full depth (the PSNR reference); ``timing`` the method's :func:`time_sessions` figures.
    """
    if isinstance(got, str):
        return _row(method, skipped=got)
    features = extract_features(classifier, got.images)
    layer_ratio = got.block_rows / full.block_rows
    return _row(
        method,
        layer_ratio=layer_ratio,
        psnr=psnr(got.images, reference.images),
        identical_to_full=torch.equal(got.images, reference.images),
        class_agreement=class_agreement(got.images, labels, classifier),
        frechet=frechet_distance(features, real_features),
        frechet_std=frechet_spread(features, real_features, seed=0),
        **timing,
        noisy=is_noisy(timing["speedup_wall_b16"], 1 / layer_ratio) if layer_ratio > 0 else None,
    )


HISTORY_KEYS = ("method", "family", "layer_ratio", "psnr", "speedup_wall_b16", "noisy")


def image_history_line(rows: list[dict], goals: dict, quick: bool, per_class: int, steps: int) -> dict:
    """The ``history.jsonl`` line of one run (#30): where and when it ran and the goal block, as bench text
    writes them (its summaries are text rows, so none here), with ``steps`` and each row's headline figures."""
    headline = [{k: r.get(k) for k in HISTORY_KEYS} | ({"skipped": r["skipped"]} if r.get("skipped") else {})
                for r in rows]
    return history_line([], goals, quick, per_class) | {"benchmark": "images", "steps": steps, "rows": headline}


def _load(args):
    """``(bench, classifier)`` from the command's arguments."""
    from ...uem.calibration_file import Calibration, calibration_label, calibrations_in
    from ..models import default_guidance_scale, load_dit_pipeline, load_uem, with_backbone

    pipe = load_dit_pipeline(args.pipeline)
    classifier = load_classifier(args.classifier)
    heads, uem_missing, base_pipe, first_backbone = {}, "", None, None
    # The shipped heads belong to the embedded DiT; another pipeline needs its own (--uem).
    embedded = args.pipeline is None or Path(args.pipeline).resolve() == DIT_DIR.resolve()
    directories = args.uem if args.uem is not None else (shipped_uem_dirs() if embedded else [])
    if not directories:
        uem_missing = (f"no UEM weights: none were passed (--uem) and {UEM_DIR} holds none yet; train "
                       f"them with `diffexit train uem`" if embedded else
                       f"no UEM weights: pass --uem DIR with heads trained on {args.pipeline} (`diffexit train uem "
                       f"--model {args.pipeline}`)")
    for directory in directories:
        uem, tuned, heads_folder = load_uem(directory)
        target = uem.config.target
        if target in heads:
            raise ValueError(f"--uem {heads[target].directory} and {directory} both hold heads trained on the "
                             f"{target!r} target; the rows are named by target, so pass one of each")
        backbone = heads_folder.parent / "transformer" if tuned is not None else None
        if backbone is not None and base_pipe is None:
            base_pipe, pipe, first_backbone = pipe, with_backbone(pipe, tuned), backbone
        elif (backbone is None) != (base_pipe is None) or (backbone is not None and backbone != first_backbone):
            raise ValueError(f"{directory} was trained on another backbone than the heads before it; benchmark "
                             f"heads of one backbone together (a fine-tuned one brings its own transformer/)")
        uem.check_matches(pipe.transformer)
        found = [(calibration_label(p), p, Calibration.load(p).sampler["steps"]) for p in calibrations_in(heads_folder)]
        heads[target] = Heads(target, uem, Path(directory), found)
    bench = Bench(pipe, heads, uem_missing, args.steps, default_guidance_scale(pipe), base_pipe)
    return bench, classifier


def shipped_uem_dirs() -> list[Path]:
    """The UEM folders the bench uses by default: the heads of the exit-trained backbone
    (``uem/digits/weights/uem-digits-exits``, one per target) when they ship, else those of the shipped backbone
    (``uem-digits``)."""
    for root in (EXITS_DIR, UEM_DIR):
        found = sorted(d for d in root.iterdir() if (d / "config.json").is_file()) if root.is_dir() else []
        if found and not (root == EXITS_DIR and not (root / "transformer" / "config.json").is_file()):
            return [d for d in found if d.name != "transformer"]
    return []


def main(argv: list[str], prog: str = "diffexit bench images") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true", help="few samples, few steps, one timing round: a few minutes")
    p.add_argument("--out", type=Path, default=Path("runs/bench-images"), help="output folder (default: %(default)s)")
    p.add_argument("--pipeline", type=Path, default=None,
                   help="a DigitsDiTPipeline folder (default: the embedded one)")
    p.add_argument("--uem", type=Path, nargs="+", default=None,
                   help=f"UEM folders (`diffexit train uem --out` layout, or bare UEMStack weights), one per target; "
                        f"the calibration files beside each add rows; default: the exit-trained ones in {EXITS_DIR} "
                        f"(on their fine-tuned backbone, against the shipped one), else those in {UEM_DIR}")
    p.add_argument("--classifier", type=Path, default=CLASSIFIER_DIR,
                   help="digits classifier folder (default: the embedded one)")
    p.add_argument("--per-class", type=int, default=None,
                   help="samples per digit (default 50: 500 digits, enough for the Frechet distance; quick 2)")
    p.add_argument("--steps", type=int, default=None, help="full sampling steps (default 25, quick 10)")
    p.add_argument("--batch", type=int, default=50,
                   help="images per pipeline call in the quality runs (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=REPEATS,
                   help=f"timing repeats, interleaved round-robin over all methods (>= {REPEATS}; default %(default)s)")
    p.add_argument("--b1-images", type=int, default=None,
                   help="images timed one per call, per round (default 4, quick 1)")
    p.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                   help="run only these rows (full depth, the reference, always runs); default: all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: at these sizes more threads only add hand-offs on shared cores)")
    args = p.parse_args(argv)
    args.per_class = args.per_class if args.per_class is not None else (2 if args.quick else 50)
    args.steps = args.steps if args.steps is not None else (10 if args.quick else 25)
    args.b1_images = args.b1_images if args.b1_images is not None else (1 if args.quick else 4)
    for name in ("per_class", "steps", "batch", "b1_images", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.rounds < REPEATS:
        p.error(f"--rounds must be >= {REPEATS} (a median of fewer timings says nothing about their spread), got "
                f"{args.rounds}")
    torch.set_num_threads(args.threads)

    try:
        bench, classifier = _load(args)
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    size = bench.pipe.transformer.config.sample_size
    real, _ = load_digits_dataset(size, "test").tensors
    real_features = extract_features(classifier, (real + 1) / 2)
    labels = torch.arange(10).repeat(args.per_class)
    methods = image_methods(bench.num_blocks, bench.steps, list(bench.heads.values()))
    # The planner's search runs before any row, so it is left out when --methods names none of its rows.
    plan_names = [plan_name(level) for level in LEVELS]
    if args.methods is None or set(args.methods) & set(plan_names):
        methods += plan_methods(bench, LEVELS, seed=args.seed)
    if args.methods is not None:
        unknown = sorted(set(args.methods) - {m.name for m in methods} - set(plan_names))
        if unknown:
            p.error(f"unknown --methods {unknown}; with {bench.num_blocks} blocks and {bench.steps} steps the rows are "
                    f"{[m.name for m in methods] + plan_names}")
        # Full depth always runs (the cost reference), and the shipped backbone too when it is the PSNR reference.
        always = {"full"} | ({"full-base"} if bench.base_pipe is not None else set())
        methods = [m for m in methods if m.name in always or m.name in args.methods]

    results, timing = run_methods(bench, methods, labels, batch=args.batch, b1_images=args.b1_images,
                                  repeats=args.rounds, seed=args.seed)
    reference = results["full-base"] if isinstance(results.get("full-base"), Quality) else results["full"]
    rows = [figures_row(m, results[m.name], results["full"], reference, timing.get(m.name), labels, classifier,
                        real_features) for m in methods]
    goals = goals_block(rows)

    args.out.mkdir(parents=True, exist_ok=True)
    train, _ = load_digits_dataset(size, "train").tensors
    real_frechet = frechet_distance(extract_features(classifier, (train[: len(real)] + 1) / 2), real_features)
    path = write_results(
        args.out, "images", args.quick, rows, samples=len(labels), per_class=args.per_class, steps=bench.steps,
        guidance_scale=bench.guidance_scale, seed=args.seed, batch=args.batch, timing_rounds=args.rounds,
        b1_images=args.b1_images, b16_images=B16, torch_threads=torch.get_num_threads(),
        pipeline=str(args.pipeline or "embedded"), uem={h.target: str(h.directory) for h in bench.heads.values()} or None,
        fine_tuned_backbone=bench.base_pipe is not None, real_frechet_train_vs_test=real_frechet,
        psnr_reference="full-base" if reference is not results["full"] else "full", goals=goals,
    )
    history = append_history(path, image_history_line(rows, goals, args.quick, args.per_class, bench.steps))
    ran = [r for r in rows if r.get("skipped") is None]
    plot_pareto(ran, args.out / "pareto.png",
                f"{len(labels)} digits; cost = blocks run / full depth at {bench.steps} steps of "
                f"{type(bench.pipe.scheduler).__name__}; PSNR against the shipped model at full depth")
    exit_rows = [m for m in methods
                 if isinstance(results[m.name], Quality) and results[m.name].depth_counts is not None]
    by_name = {r["method"]: r for r in rows}
    plot_samples([("full depth", results["full"].images)] + [
        (f"{m.name}\nlayers {by_name[m.name]['layer_ratio']:.2f}", results[m.name].images) for m in exit_rows
    ], args.per_class, args.out / "samples.png")
    plots = [args.out / "pareto.png", args.out / "samples.png"]
    if exit_rows:  # a run of rows without exits (--methods) has no depths to plot
        plot_exit_depths([(f"{m.name} (layers {by_name[m.name]['layer_ratio']:.2f})", results[m.name].depth_counts,
                           results[m.name].timesteps) for m in exit_rows], args.out / "exit_depths.png")
        plots.append(args.out / "exit_depths.png")
    print(markdown_table(rows, COLUMNS))
    for r in rows:
        if r.get("skipped"):
            print(f"- {r['method']} skipped: {r['skipped']}")
        elif r["identical_to_full"] and r["method"] not in ("full", "full-base"):
            print(f"- {r['method']}: images identical to the reference (no PSNR)")
    print("\ngoal (#28): at >= 2 of the PSNR levels, the cheapest composed row costs <= 0.8x the cheapest "
          "single technique, with a batch-16 wall speedup >= 0.8x its cost's reciprocal")
    for level in goals["levels"]:
        single, comp = level["single"], level["composed"]
        print(f"- {level['psnr']:g} dB: single {single and single['method']} "
              f"({single and format(single['layer_ratio'], '.3f')}), composed {comp and comp['method']} "
              f"({comp and format(comp['layer_ratio'], '.3f')}, b16 {comp and format(comp['speedup_wall_b16'], '.2f')}x)"
              f": {'met' if level['met'] else 'not met'}")
    print(f"goal {'met' if goals['met'] else 'NOT met'} ({goals['levels_met']} of {len(goals['levels'])} levels)")
    print(f"\n{len(labels)} samples, {bench.steps} steps, guidance {bench.guidance_scale:g}; real digits train vs test "
          f"Frechet {real_frechet:.2f}\nresults, plots: {path}, {', '.join(map(str, plots))}; history: {history}")
    return 0
