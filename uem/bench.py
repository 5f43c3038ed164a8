"""``diffexit bench images``: DeeDiff early exits against full depth, static depth schedules, fewer sampling steps
and diffusers' FirstBlockCache, side by side on the embedded digits DiT.

Every method draws the same digits (``--per-class`` of each class, in batches seeded ``seed, seed + 1, ...``) from
the same initial noise, with the pipeline's default guidance scale, so every image has a full-depth twin. Per method:

- ``layer_ratio``: transformer blocks run over what full depth at full steps runs on the same samples. Hooks on the
  blocks count image rows per block call, so rows that exited early, steps not taken and blocks FirstBlockCache
  skipped all count as not run.
- ``speedup_wall_b1``, ``speedup_wall_b16``: full depth's wall-clock over the method's, generating one image per
  call and 16 per call. All methods are timed in the same rounds, each round bracketed by two full-depth timings;
  the figure is the median over rounds of full / method.
- ``psnr`` (dB): of the mean squared error against the full-depth images from the same noise, pixels in [0, 1];
  null where the images are bit-identical to full depth's (``identical_to_full``), the full-depth row included.
- ``class_agreement``: the fraction the digits classifier reads as the requested digit.
- ``frechet``: Frechet distance of the classifier's features against the 300 held-out real digits.

The methods are :func:`image_methods`, one :class:`Method` entry per row; an entry names a builder that sets up a
:class:`Session` (a pipeline configured for that method). A builder that cannot run (no UEM weights, say) raises
:class:`MethodSkipped`, and the row says why instead of carrying figures.

When the UEM folder holds a fine-tuned backbone (``diffexit train uem --mode full`` trains one), every method runs on
that backbone, so they all differ only in how they save compute; a ``full-base`` row then measures the backbone the
pipeline shipped with, against the same full-depth reference.

Writes ``DIR/results.json``, ``DIR/pareto.png`` (quality against layer ratio and speedup), ``DIR/samples.png`` (full
depth next to the early-exit methods), ``DIR/exit_depths.png`` (share of samples exiting at each depth, per sampling
step) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..app.reporting import markdown_table, write_results
from ..samplers.schedules import ThresholdSchedule
from .embedded import CLASSIFIER_DIR, DIT_DIR, UEM_DIR
from .exit_rules import ExitRule, StaticDepth, UncertaintyThreshold

DEFAULT_UEM_DIR = UEM_DIR
# Constant DeeDiff thresholds on the mean token uncertainty, and schedules that allow earlier exits on noisy steps,
# per UEM target: each target's uncertainty lives on its own scale (paper: the error against the true noise, which
# stays high on noisy steps; exit-cost: the distance from full depth, near 0 at deep blocks; normalized: a share in
# [0, 1)). Unknown targets use the paper's grid.
THRESHOLDS = {"paper": (0.05, 0.1, 0.15, 0.2, 0.3), "exit-cost": (0.02, 0.05, 0.1, 0.2), "normalized": (0.2, 0.4, 0.6)}
SCHEDULES = {"paper": (ThresholdSchedule("linear", 0.3, 0.1), ThresholdSchedule("cosine", 0.2, 0.05)),
             "exit-cost": (ThresholdSchedule("linear", 0.2, 0.02),), "normalized": (ThresholdSchedule("linear", 0.6, 0.2),)}
# Static depths as fractions of the model's blocks, per equal stretch of sampling progress (noisiest first).
STATIC_FRACTIONS = ((1 / 3, 2 / 3, 1.0), (1 / 4, 1 / 2, 3 / 4, 1.0), (1 / 2,))
STEP_FRACTIONS = (1 / 4, 1 / 3, 1 / 2, 2 / 3)
FBC_THRESHOLDS = (0.05, 0.1, 0.2, 0.4)  # diffusers' default is 0.05
B16 = 16
FIGURES = ("layer_ratio", "speedup_wall_b1", "speedup_wall_b16", "psnr", "class_agreement", "frechet")
COLUMNS = [("method", "method", ""), ("layer_ratio", "layer ratio", ".3f"), ("speedup_wall_b1", "speedup b1", ".2f"),
           ("speedup_wall_b16", "speedup b16", ".2f"), ("psnr", "PSNR dB", ".1f"),
           ("class_agreement", "class agr.", ".3f"), ("frechet", "Frechet", ".2f")]


class MethodSkipped(Exception):
    """Raised by a method's builder when it cannot run here; the message is the reason the row reports."""


@dataclass
class Heads:
    """One set of UEM heads: ``target`` (from its config) names its rows; ``calibrations`` are the
    ``diffexit calibrate uem`` files found beside it, as ``(label, path)``."""

    target: str
    uem: torch.nn.Module
    directory: Path
    calibrations: list[tuple[str, Path]]


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
        return len(self.pipe.transformer.transformer_blocks)

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


def exits(rule: Callable[[Bench], ExitRule], target: Optional[str] = None) -> Callable[[Bench], Session]:
    """Early exits under the rule ``rule(bench)`` returns, reading the heads trained on ``target`` (``None``: the
    rule reads no heads), progress from an ``ExitAwareScheduler``."""

    def build(bench: Bench) -> Session:
        from ..samplers.exit_scheduler import ExitAwareScheduler
        from .early_exit import enable_early_exit

        if target is not None and target not in bench.heads:
            raise MethodSkipped(bench.uem_missing)
        chosen = rule(bench)
        pipe = bench.copy_pipe()
        early_exit = enable_early_exit(pipe, bench.heads[target].uem if target is not None else None, chosen)
        pipe.scheduler = ExitAwareScheduler(pipe.scheduler, early_exit)
        return Session(pipe, bench.steps, exit_scheduler=pipe.scheduler)

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


def calibrated(path: Path, target: str) -> Callable[[Bench], ExitRule]:
    """The rule in the calibration file ``path``, checked against the bench's transformer and ``target``'s heads."""

    def rule(bench: Bench) -> ExitRule:
        from .calibration import Calibration

        try:
            return Calibration.load(path).checked_rule(
                bench.pipe.transformer, bench.heads[target].uem, steps=bench.steps,
                guidance_scale=bench.guidance_scale, scheduler=type(bench.pipe.scheduler).__name__)
        except ValueError as e:
            raise MethodSkipped(str(e)) from None

    return rule


def image_methods(num_blocks: int, steps: int, heads: Sequence[Heads] = ()) -> list[Method]:
    """The benchmark's rows for a model of ``num_blocks`` blocks sampled at ``steps`` steps; full depth first.

    DeeDiff rows come per set of ``heads`` (named by target), with each set's calibration files; without heads, one
    ``deediff`` row stands for them and reports why it was skipped.
    """
    methods = [Method("full", "full", {"steps": steps, "blocks": num_blocks}, plain()),
               Method("full-base", "base", {"steps": steps, "backbone": "shipped"}, plain(base=True))]
    if not heads:
        methods.append(Method("deediff", "deediff", {}, exits(lambda bench: UncertaintyThreshold(0.1), "paper")))
    for h in heads:
        for t in THRESHOLDS.get(h.target, THRESHOLDS["paper"]):
            methods.append(Method(f"deediff-{h.target}-{t:g}", f"deediff-{h.target}", {"target": h.target, "threshold": t},
                                  exits(lambda bench, t=t: UncertaintyThreshold(t), h.target)))
        for s in SCHEDULES.get(h.target, SCHEDULES["paper"]):
            methods.append(Method(f"deediff-{h.target}-{s.kind}-{s.high:g}-{s.low:g}", f"deediff-{h.target}-schedule",
                                  {"target": h.target, "schedule": s.to_dict()},
                                  exits(lambda bench, s=s: UncertaintyThreshold(s), h.target)))
        for label, path in h.calibrations:
            methods.append(Method(f"deediff-{h.target}-cal-{label}", f"deediff-{h.target}-calibrated",
                                  {"target": h.target, "calibration": path.name},
                                  exits(calibrated(path, h.target), h.target)))
    static = []
    for fractions in STATIC_FRACTIONS:
        depths = tuple(max(1, round(f * num_blocks)) for f in fractions)
        if depths not in static:
            static.append(depths)
    for depths in static:
        methods.append(Method("static-" + "-".join(map(str, depths)), "static", {"depths": list(depths)},
                              exits(lambda bench, d=depths: StaticDepth(d))))
    fewer = sorted({max(1, round(f * steps)) for f in STEP_FRACTIONS} - {steps})
    for n in fewer:
        methods.append(Method(f"steps-{n}", "steps", {"steps": n}, plain(n)))
    for t in FBC_THRESHOLDS:
        methods.append(Method(f"fbc-{t:g}", "fbc", {"threshold": t}, first_block_cache(t)))
    return methods


@contextlib.contextmanager
def count_block_rows(transformer) -> Iterator[list]:
    """Count image rows through the transformer's blocks: yields a one-item list, ``[rows x blocks run]``.

    A block that FirstBlockCache skips hands back its input tensor itself, so it counts as not run.
    """
    total = [0]

    def hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        if output is not hidden:
            total[0] += hidden.shape[0]

    handles = [b.register_forward_hook(hook, with_kwargs=True) for b in transformer.transformer_blocks]
    try:
        yield total
    finally:
        for h in handles:
            h.remove()


@dataclass
class Quality:
    """What one method's quality run measured."""

    images: torch.Tensor  # [N, C, S, S] in [0, 1]
    block_rows: int
    depth_counts: Optional[torch.Tensor]  # [steps, num_blocks] samples exiting at each depth, early exits only
    timesteps: Optional[torch.Tensor]  # [steps]


def run_quality(session: Session, labels: torch.Tensor, batch: int, seed: int, guidance_scale: float) -> Quality:
    """Generate one image per label, in batches of ``batch`` seeded ``seed, seed + 1, ...``."""
    images, counts, timesteps = [], None, None
    with count_block_rows(session.pipe.transformer) as rows:
        for i, chunk in enumerate(labels.split(batch)):
            images.append(session.generate(chunk, seed + i, guidance_scale))
            if session.exit_scheduler is not None:
                stats = session.exit_scheduler.statistics
                counts = stats.depth_counts if counts is None else counts + stats.depth_counts
                timesteps = stats.timesteps
    return Quality(torch.cat(images), rows[0], counts, timesteps)


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of the mean squared error over all pixels of all images, both in [0, 1]."""
    mse = float(((images.float() - reference.float()) ** 2).mean())
    if mse == 0:
        raise ValueError("the images equal the reference, so their PSNR is infinite; report them as identical")
    return 10.0 * math.log10(1.0 / mse)


def _time_call(session: Session, labels: torch.Tensor, per_call: int, seed: int, guidance_scale: float) -> float:
    start = time.perf_counter()
    for i, chunk in enumerate(labels.split(per_call)):
        session.generate(chunk, seed + i, guidance_scale)
    return time.perf_counter() - start


def time_sessions(reference: Session, sessions: dict[str, Session], *, b1_images: int, rounds: int, seed: int,
                  guidance_scale: float) -> dict[str, dict]:
    """Wall-clock speedups over ``reference`` at batch 1 and batch 16, measured in the same rounds.

    Each round times the reference, every session (in alternating order from round to round), then the reference
    again; a session's ratio in that round is the mean of the two reference timings over its own.

    Returns ``{name: {"speedup_wall_b1", "speedup_wall_b16", "seconds_b1", "seconds_b16"}}`` (medians over rounds).
    """
    setups = {"b1": (torch.arange(b1_images) % 10, 1), "b16": (torch.arange(B16) % 10, B16)}
    ratios = {name: {k: [] for k in setups} for name in sessions}
    seconds = {name: {k: [] for k in setups} for name in sessions}
    names = list(sessions)
    for r in range(rounds):
        for key, (labels, per_call) in setups.items():
            before = _time_call(reference, labels, per_call, seed, guidance_scale)
            took = {n: _time_call(sessions[n], labels, per_call, seed, guidance_scale)
                    for n in (names if r % 2 == 0 else names[::-1])}
            after = _time_call(reference, labels, per_call, seed, guidance_scale)
            for n, t in took.items():
                ratios[n][key].append((before + after) / 2 / t)
                seconds[n][key].append(t)
    return {n: {**{f"speedup_wall_{k}": statistics.median(ratios[n][k]) for k in setups},
                **{f"seconds_{k}": statistics.median(seconds[n][k]) for k in setups}} for n in names}


def heads_dir(directory: Path) -> Path:
    """Where the heads of a UEM folder sit: ``DIR/uem`` in a ``diffexit train uem --out DIR`` run, else ``DIR``."""
    return directory / "uem" if (directory / "uem" / "config.json").is_file() else directory


def load_uem(directory: Path):
    """``(UEMStack, fine-tuned transformer or None)`` from a UEM folder.

    The folder is what ``diffexit train uem --out DIR`` writes (and what ships in ``uem/weights/uem-digits``):
    ``DIR/uem`` holds the heads and, after a full fine-tune, ``DIR/transformer`` the backbone they were trained
    with. A bare ``UEMStack.save_pretrained`` folder works too.
    """
    from diffusers import DiTTransformer2DModel

    from .heads import UEMStack

    directory = Path(directory)
    heads = heads_dir(directory)
    if not (heads / "config.json").is_file():
        raise FileNotFoundError(
            f"no UEM weights in {directory} (expected {directory}/uem/config.json or {directory}/config.json); "
            f"train them with `diffexit train uem --out {directory}`"
        )
    uem = UEMStack.from_pretrained(str(heads), dtype=torch.float32).eval()
    backbone = directory / "transformer"
    transformer = None
    if heads != directory and (backbone / "config.json").is_file():
        transformer = DiTTransformer2DModel.from_pretrained(str(backbone), dtype=torch.float32).eval()
    return uem, transformer


def _row(method: Method, **figures) -> dict:
    return {"method": method.name, "family": method.family, "params": method.params,
            **{k: figures.get(k) for k in FIGURES}, **{k: v for k, v in figures.items() if k not in FIGURES}}


def plot_pareto(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"full": "black", "base": "tab:gray", "static": "tab:orange", "steps": "tab:green", "fbc": "tab:red"}
    # DeeDiff families (per target: constant, schedule, calibrated) take the remaining colours in order of appearance.
    spare = iter(["tab:blue", "tab:purple", "tab:cyan", "tab:olive", "tab:pink", "tab:brown", "navy", "teal", "gold"])
    for family in dict.fromkeys(r["family"] for r in rows):
        if family not in colors:
            colors[family] = next(spare, "tab:gray")
    panels = [("layer_ratio", "class_agreement", "layer ratio"), ("speedup_wall_b1", "class_agreement",
              "wall-clock speedup, batch 1"), ("layer_ratio", "psnr", "layer ratio")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (x, y, xlabel) in zip(axes, panels):
        for family, color in colors.items():
            pts = [(r[x], r[y]) for r in rows if r["family"] == family and r[x] is not None and r[y] is not None]
            if pts:
                pts.sort()
                scale = 100.0 if y == "class_agreement" else 1.0
                style = {"full": "*", "base": "D"}.get(family, "o-")
                ax.plot([p[0] for p in pts], [scale * p[1] for p in pts], style, color=color, label=family,
                        markersize=9 if family == "full" else 5, linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("class agreement (%)" if y == "class_agreement" else "PSNR vs full depth (dB)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _grid(images: torch.Tensor, per_class: int, shown: int) -> torch.Tensor:
    """``[shown * S, 10 * S]``: row ``i`` holds sample ``i`` of every digit (labels cycle 0..9)."""
    size = images.shape[-1]
    picked = images[: 10 * min(per_class, shown), 0]
    rows = picked.reshape(-1, 10, size, size)
    return rows.permute(0, 2, 1, 3).reshape(rows.shape[0] * size, 10 * size)


def plot_samples(panels: list[tuple[str, torch.Tensor]], per_class: int, path: Path, shown: int = 4) -> None:
    """One grid per method (``shown`` samples of every digit), full depth first, five grids to a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(5, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.8 * cols, (0.9 + 0.3 * min(per_class, shown)) * nrows),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, images) in zip(axes.flat, panels):
        ax.imshow(_grid(images, per_class, shown).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_exit_depths(panels: list[tuple[str, torch.Tensor, torch.Tensor]], path: Path) -> None:
    """Per method, the share of samples that ran ``d`` blocks at each sampling step (``[steps, blocks]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.3 * cols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, counts, timesteps) in zip(axes.flat, panels):
        share = counts.float() / counts.sum(1, keepdim=True).clamp(min=1)
        steps, blocks = share.shape
        ax.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="upper",
                  extent=(0.5, blocks + 0.5, steps - 0.5, -0.5))
        ticks = sorted({0, steps // 2, steps - 1})
        ax.set_yticks(ticks, [f"{int(timesteps[t])}" for t in ticks])
        ax.set_xlabel("blocks run")
        ax.set_ylabel("timestep (sampling runs down)")
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_methods(bench: Bench, methods: list[Method], labels: torch.Tensor, *, batch: int, b1_images: int,
                rounds: int, seed: int) -> tuple[dict, dict]:
    """Build every method's session and run its quality pass, then time them all against ``"full"``.

    Returns ``(results, timing)``: ``results[name]`` is a :class:`Quality`, or the reason the method was skipped;
    ``timing`` is :func:`time_sessions`' answer for every method that ran except full depth.
    """
    sessions, results = {}, {}
    with tqdm(total=len(methods), desc="bench images", unit="method") as bar:
        for m in methods:
            bar.set_postfix_str(m.name)
            try:
                sessions[m.name] = m.build(bench)
            except MethodSkipped as e:
                results[m.name] = str(e)
            else:
                with torch.no_grad():
                    results[m.name] = run_quality(sessions[m.name], labels, batch, seed, bench.guidance_scale)
            bar.update(1)
    timed = {n: s for n, s in sessions.items() if n != "full"}
    print(f"timing {len(timed)} methods against full depth ({rounds} round(s), {b1_images} image(s) at batch 1, "
          f"{B16} at batch {B16})", file=sys.stderr)
    with torch.no_grad():
        timing = time_sessions(sessions["full"], timed, b1_images=b1_images, rounds=rounds, seed=seed,
                               guidance_scale=bench.guidance_scale)
    return results, timing


def figures_row(method: Method, got, full: Quality, timing: Optional[dict], labels: torch.Tensor, classifier,
                real_features: torch.Tensor) -> dict:
    """The results.json row of ``method``: its figures, or the reason it was skipped (``got`` is then a string).

    Full depth is the timing reference, so its speedups are 1 by definition (``timing`` is ``None`` for it).
    """
    from .classifier import class_agreement, extract_features, frechet_distance

    if isinstance(got, str):
        return _row(method, skipped=got)
    identical = torch.equal(got.images, full.images)
    return _row(
        method,
        layer_ratio=got.block_rows / full.block_rows,
        psnr=None if identical else psnr(got.images, full.images),
        identical_to_full=identical,
        class_agreement=class_agreement(got.images, labels, classifier),
        frechet=frechet_distance(extract_features(classifier, got.images), real_features),
        **(timing if timing is not None else {"speedup_wall_b1": 1.0, "speedup_wall_b16": 1.0}),
    )


def _load(args):
    """``(bench, classifier, notes)`` from the command's arguments."""
    from .calibration import calibration_label, calibrations_in
    from .classifier import load_classifier
    from .pipeline import DigitsDiTPipeline

    if not (Path(args.pipeline) / "model_index.json").is_file():
        raise FileNotFoundError(f"no pipeline in {args.pipeline} (model_index.json missing); the embedded one is "
                                f"made by `diffexit train image --export {DIT_DIR}`")
    pipe = DigitsDiTPipeline.from_pretrained(str(args.pipeline), dtype=torch.float32, local_files_only=True)
    pipe.transformer.eval()
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier(args.classifier)
    heads, uem_missing, base_pipe = {}, "", None
    # The shipped heads belong to the embedded DiT; another pipeline needs its own (--uem).
    embedded = Path(args.pipeline).resolve() == DIT_DIR.resolve()
    directories = args.uem if args.uem is not None else (shipped_uem_dirs() if embedded else [])
    if not directories:
        uem_missing = (f"no UEM weights: none were passed (--uem) and {DEFAULT_UEM_DIR} holds none yet; train "
                       f"them with `diffexit train uem`" if embedded else
                       f"no UEM weights: pass --uem DIR with heads trained on {args.pipeline} (`diffexit train uem "
                       f"--model {args.pipeline}`)")
    for directory in directories:
        uem, tuned = load_uem(directory)
        target = uem.config.target
        if target in heads:
            raise ValueError(f"--uem {heads[target].directory} and {directory} both hold heads trained on the "
                             f"{target!r} target; the rows are named by target, so pass one of each")
        if tuned is not None:
            if len(directories) > 1:
                raise ValueError(f"{directory} brings a fine-tuned backbone; benchmark it on its own (one --uem), "
                                 f"since the other heads were trained on another backbone")
            base_pipe = pipe
            pipe = type(pipe)(**{**pipe.components, "transformer": tuned})
            pipe.set_progress_bar_config(disable=True)
        uem.check_matches(pipe.transformer)
        found = [(calibration_label(p), p) for p in calibrations_in(heads_dir(Path(directory)))]
        heads[target] = Heads(target, uem, Path(directory), found)
    guidance = float(inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default)
    bench = Bench(pipe, heads, uem_missing, args.steps, guidance, base_pipe)
    return bench, classifier


def shipped_uem_dirs() -> list[Path]:
    """The UEM folders that ship in ``uem/weights/uem-digits``: one per target, each a ``UEMStack`` folder."""
    if not DEFAULT_UEM_DIR.is_dir():
        return []
    return sorted(d for d in DEFAULT_UEM_DIR.iterdir() if (d / "config.json").is_file())


def main(argv: list[str], prog: str = "diffexit bench images") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few samples, few steps, one timing round: a few minutes")
    p.add_argument("--out", type=Path, default=Path("runs/bench-images"), help="output folder (default: %(default)s)")
    p.add_argument("--pipeline", type=Path, default=DIT_DIR,
                   help="a DigitsDiTPipeline folder (default: the embedded one)")
    p.add_argument("--uem", type=Path, nargs="+", default=None,
                   help=f"UEM folders (`diffexit train uem --out` layout, or bare UEMStack weights), one per target; "
                        f"the calibration files beside each add rows; default: those in {DEFAULT_UEM_DIR}, or none "
                        f"(the DeeDiff rows are then skipped)")
    p.add_argument("--classifier", type=Path, default=CLASSIFIER_DIR,
                   help="digits classifier folder (default: the embedded one)")
    p.add_argument("--per-class", type=int, default=None, help="samples per digit (default 10, quick 2)")
    p.add_argument("--steps", type=int, default=None, help="full sampling steps (default 25, quick 10)")
    p.add_argument("--batch", type=int, default=50,
                   help="images per pipeline call in the quality runs (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default 3, quick 1)")
    p.add_argument("--b1-images", type=int, default=None,
                   help="images timed one per call, per round (default 4, quick 1)")
    p.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                   help="run only these rows (full depth, the reference, always runs); default: all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: at these sizes more threads only add hand-offs on shared cores)")
    args = p.parse_args(argv)
    args.per_class = args.per_class if args.per_class is not None else (2 if args.quick else 10)
    args.steps = args.steps if args.steps is not None else (10 if args.quick else 25)
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    args.b1_images = args.b1_images if args.b1_images is not None else (1 if args.quick else 4)
    for name in ("per_class", "steps", "batch", "rounds", "b1_images", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)

    from .classifier import extract_features, frechet_distance
    from .digits import load_digits_dataset

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
    if args.methods is not None:
        unknown = sorted(set(args.methods) - {m.name for m in methods})
        if unknown:
            p.error(f"unknown --methods {unknown}; with {bench.num_blocks} blocks and {bench.steps} steps the rows are "
                    f"{[m.name for m in methods]}")
        methods = [m for m in methods if m.name == "full" or m.name in args.methods]

    results, timing = run_methods(bench, methods, labels, batch=args.batch, b1_images=args.b1_images,
                                  rounds=args.rounds, seed=args.seed)
    rows = [figures_row(m, results[m.name], results["full"], timing.get(m.name), labels, classifier, real_features)
            for m in methods]

    args.out.mkdir(parents=True, exist_ok=True)
    train, _ = load_digits_dataset(size, "train").tensors
    reference = frechet_distance(extract_features(classifier, (train[: len(real)] + 1) / 2), real_features)
    path = write_results(
        args.out, "images", args.quick, rows, samples=len(labels), per_class=args.per_class, steps=bench.steps,
        guidance_scale=bench.guidance_scale, seed=args.seed, batch=args.batch, timing_rounds=args.rounds,
        b1_images=args.b1_images, b16_images=B16, torch_threads=torch.get_num_threads(),
        pipeline=str(args.pipeline), uem={h.target: str(h.directory) for h in bench.heads.values()} or None,
        fine_tuned_backbone=bench.base_pipe is not None, real_frechet_train_vs_test=reference,
    )
    ran = [r for r in rows if r.get("skipped") is None]
    plot_pareto(ran, args.out / "pareto.png",
                f"{len(labels)} digits, {bench.steps} steps of {type(bench.pipe.scheduler).__name__}, "
                f"{bench.num_blocks} blocks")
    exit_rows = [m for m in methods
                 if isinstance(results[m.name], Quality) and results[m.name].depth_counts is not None]
    by_name = {r["method"]: r for r in rows}
    plot_samples([("full depth", results["full"].images)] + [
        (f"{m.name}\nlayers {by_name[m.name]['layer_ratio']:.2f}", results[m.name].images) for m in exit_rows
    ], args.per_class, args.out / "samples.png")
    plot_exit_depths([(f"{m.name} (layers {by_name[m.name]['layer_ratio']:.2f})", results[m.name].depth_counts,
                       results[m.name].timesteps) for m in exit_rows], args.out / "exit_depths.png")
    print(markdown_table(rows, COLUMNS))
    for r in rows:
        if r.get("skipped"):
            print(f"- {r['method']} skipped: {r['skipped']}")
        elif r["identical_to_full"] and r["method"] != "full":
            print(f"- {r['method']}: images identical to full depth (no PSNR)")
    print(f"\n{len(labels)} samples, {bench.steps} steps, guidance {bench.guidance_scale:g}; real digits train vs test "
          f"Frechet {reference:.2f}\nresults, plots: {path}, {args.out / 'pareto.png'}, {args.out / 'samples.png'}, "
          f"{args.out / 'exit_depths.png'}")
    return 0
