"""The demo's image tab: one batch sampled with an exit rule, beside the same noise at full depth."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ...uem.exit_config import EarlyExitConfig
from ...uem.image_quality import psnr
from ...uem.rule_spec import describe_exit_rule
from .forms import MAX_IMAGE_STEPS, MAX_IMAGES, _as_float, _as_int, _choice, _error, _schedule
from .models import Models

GRID_COLUMNS = 4  # two grids side by side: four columns keep each about square
GRID_CELL_PIXELS = 96  # digits are 16x16: upscaled (nearest) so their pixels stay visible
# Samplers whose initial noise is the unit Gaussian the pipeline draws (it does not scale by init_noise_sigma,
# as DiTPipeline does not), so Euler-family samplers are left out.
SAMPLERS = {"DDIM": "DDIMScheduler", "DPM-Solver++": "DPMSolverMultistepScheduler", "DDPM": "DDPMScheduler"}
RULE_OFF, RULE_THRESHOLD, RULE_SCHEDULE, RULE_STATIC = "off", "DeeDiff: threshold", "DeeDiff: schedule", "static depth"
RULE_CALIBRATED = "DeeDiff: calibrated"
IMAGE_RULES = (RULE_OFF, RULE_THRESHOLD, RULE_SCHEDULE, RULE_CALIBRATED, RULE_STATIC)


def _labels(classes, count: int, num_classes: int) -> list[int]:
    """``count`` labels cycling through the chosen classes: a list (the digits' check boxes) or a text of class ids
    separated by commas or spaces (a model with many classes)."""
    if isinstance(classes, str):
        try:
            classes = [int(c) for c in classes.replace(",", " ").split()]
        except ValueError:
            raise _error(f"classes must be whole numbers separated by commas, like '1, 207, 360'; got "
                         f"{classes!r}") from None
    if not classes:
        raise _error(f"pick at least one class (0-{num_classes - 1})")
    chosen = [_as_int("class", c, 0, num_classes - 1) for c in classes]
    return [chosen[i % len(chosen)] for i in range(count)]


def exit_config_from_form(models: Models, rule: str, threshold, kind, high, low, k, depths: str,
                          budget) -> EarlyExitConfig:
    """The :class:`~diffexit.uem.exit_config.EarlyExitConfig` the form names, checked (gr.Error if not); a DeeDiff
    rule reads the demo's UEM folder."""
    rule = _choice("early-exit rule", rule, IMAGE_RULES)
    if rule == RULE_CALIBRATED:
        files = models.calibrations()
        if not files:
            raise _error("the UEMs have no calibration files beside them; make some with `diffexit calibrate uem "
                         "--uem DIR --budget B`, or pick another rule")
        method, params = "deediff", {"calibration": str(files[_choice("exit-error budget", str(budget),
                                                                       tuple(files))])}
    elif rule == RULE_OFF:
        method, params = "full", {}
    elif rule == RULE_STATIC:
        try:
            parsed = [int(d) for d in str(depths).replace(",", " ").split()]
        except ValueError:
            raise _error(f"static depths must be whole numbers of blocks separated by spaces, like '4 8 12'; "
                         f"got {depths!r}") from None
        method, params = "static", {"depths": parsed}
    elif rule == RULE_THRESHOLD:
        method, params = "deediff", {"threshold": _as_float("uncertainty threshold", threshold, 0.0, 1.0)}
    else:
        schedule = _schedule(kind, high, low, k, what="uncertainty", bounds=(0.0, 1.0))
        method, params = "deediff", {"threshold": schedule.to_dict()}
    if method == "deediff":
        models.uem()  # says how to start the demo with heads when it has none, and fails early on a broken folder
    try:
        return EarlyExitConfig(method, **params, uem=str(models.uem_path) if method == "deediff" else None)
    except ValueError as e:
        raise models.error(str(e)) from e


def _scheduler(pipe, sampler: str):
    import diffusers

    return getattr(diffusers, SAMPLERS[sampler]).from_config(pipe.scheduler.config)


def _sample(pipe, labels: list[int], steps: int, guidance: float, seed: int) -> tuple[torch.Tensor, float]:
    """``(images [B, C, S, S] in [0, 1], seconds)``; the seed fixes the initial noise (and DDPM's step noise)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    start = time.perf_counter()
    images = pipe(labels, guidance_scale=guidance, generator=generator, num_inference_steps=steps,
                  output_type="pt").images
    return images.cpu(), time.perf_counter() - start


def image_grid(images: torch.Tensor, columns: int = GRID_COLUMNS, cell: int = GRID_CELL_PIXELS) -> np.ndarray:
    """Tile ``images`` ``[B, C, S, S]`` in [0, 1] into one uint8 RGB picture ``[H, W, 3]``.

    Rows of ``columns`` images, each upscaled by an integer factor (nearest) to about ``cell`` pixels, with a
    2-pixel white gutter.
    """
    b, c, s, _ = images.shape
    scale = max(1, cell // s)
    tiles = images.clamp(0, 1).repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    tiles = tiles.expand(b, 3, *tiles.shape[-2:]) if c == 1 else tiles[:, :3]
    cols, size, gap = min(columns, b), s * scale, 2
    rows = math.ceil(b / cols)
    grid = torch.ones(3, rows * (size + gap) + gap, cols * (size + gap) + gap)
    for i, tile in enumerate(tiles):
        r, q = divmod(i, cols)
        y, x = gap + r * (size + gap), gap + q * (size + gap)
        grid[:, y:y + size, x:x + size] = tile
    return (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def depth_heatmap(depth_counts: torch.Tensor, timesteps: torch.Tensor, title: str):
    """A matplotlib figure: sampling step (rows, labelled by timestep) by blocks run (columns), shaded by samples.

    ``depth_counts`` is ``ExitStatistics.depth_counts`` ``[S, L]``; ``timesteps`` is ``[S]``.
    """
    from matplotlib.figure import Figure

    counts = depth_counts.numpy()
    steps, blocks = counts.shape
    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.subplots()
    image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(blocks), [str(d) for d in range(1, blocks + 1)])
    every = max(1, math.ceil(steps / 10))
    rows = list(range(0, steps, every))
    ax.set_yticks(rows, [f"{i + 1} (t={int(timesteps[i])})" for i in rows])
    ax.set_xlabel("blocks run before exiting")
    ax.set_ylabel("sampling step (timestep)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="samples")
    fig.tight_layout()
    return fig


def run_images(models: Models, digits, count, steps, sampler, guidance, rule, threshold, kind, high, low, k, depths,
               seed, budget=None, progress=None):
    """Sample with the chosen exit rule, then the same noise at full depth.

    Returns ``(early-exit grid, full-depth grid, summary markdown, heatmap figure, details dict)``.
    """
    from ...samplers.early_exits import attach_early_exits, detach_early_exits

    count = _as_int("number of images", count, 1, MAX_IMAGES)
    labels = _labels(digits, count, models.num_classes())
    steps = _as_int("sampling steps", steps, 1, MAX_IMAGE_STEPS)
    sampler = _choice("sampler", sampler, tuple(SAMPLERS))
    guidance = _as_float("guidance scale", guidance, 0.0, 20.0)
    seed = _as_int("seed", seed, 0, 2**63 - 1)
    config = exit_config_from_form(models, rule, threshold, kind, high, low, k, depths, budget)
    pipe = models.pipeline()

    with models.image_run_lock:
        original = pipe.scheduler
        pipe.scheduler = _scheduler(pipe, sampler)
        try:
            exits = attach_early_exits(pipe, config, steps=steps, guidance_scale=guidance)
        except ValueError as e:  # a calibration made for another setup names its file
            pipe.scheduler = original
            raise models.error(str(e)) from e
        try:
            if progress is not None:
                progress(0.0, desc="sampling with early exits")
            # Early exits run first, so the first call's warm-up counts against them, not for them.
            early, early_s = _sample(pipe, labels, steps, guidance, seed)
            stats = pipe.scheduler.statistics
        finally:
            detach_early_exits(pipe)
            pipe.scheduler = original
        if progress is not None:
            progress(0.5, desc="sampling at full depth")
        pipe.scheduler = _scheduler(pipe, sampler)
        try:
            full, full_s = _sample(pipe, labels, steps, guidance, seed)
        finally:
            pipe.scheduler = original

    blocks_run, available = int(stats.depths.sum()), stats.num_blocks * stats.depths.numel()
    quality = psnr(early, full)
    details = {
        "labels": labels, "steps": steps, "sampler": sampler, "guidance_scale": guidance, "seed": seed,
        "rule": describe_exit_rule(exits.rule), "num_blocks": stats.num_blocks,
        "layer_ratio": stats.layer_ratio, "blocks_run": blocks_run, "blocks_available": available,
        "seconds_early_exit": early_s, "seconds_full_depth": full_s, "speedup_wall": full_s / early_s,
        "psnr_db": quality, "timesteps": stats.timesteps.tolist(), "depth_counts": stats.depth_counts.tolist(),
    }
    verdict = "identical to full depth" if quality is None else f"PSNR {quality:.1f} dB against full depth"
    summary = (
        f"**Layer ratio {stats.layer_ratio:.3f}**: {blocks_run} of {available} blocks "
        f"({steps} steps x {count} images x {stats.num_blocks} blocks). "
        f"Early exits {early_s:.2f} s, full depth {full_s:.2f} s: **{full_s / early_s:.2f}x** wall-clock. "
        f"{verdict}."
    )
    figure = depth_heatmap(stats.depth_counts, stats.timesteps,
                           f"{describe_exit_rule(exits.rule)}: layer ratio {stats.layer_ratio:.2f}")
    return image_grid(early), image_grid(full), summary, figure, details


def run_plan(models: Models, plan_file, digits, count, seed, progress=None):
    """Sample with a ``diffexit calibrate images`` plan (its steps, exits and cache, at its guidance and sampler),
    then the same noise at full depth and the plan's full steps, the reference it was made against.

    Returns what :func:`run_images` returns; the details add ``plan`` (its name), ``cost`` (blocks run over the
    reference's) and the plan's own held-out figures.
    """
    from ...uem.block_adapters import num_blocks
    from ..image_plan import ImagePlan, planned_pipeline

    count = _as_int("number of images", count, 1, MAX_IMAGES)
    labels = _labels(digits, count, models.num_classes())
    seed = _as_int("seed", seed, 0, 2**63 - 1)
    if not plan_file:
        raise _error("choose a plan file, one `diffexit calibrate images --psnr DB --out FILE` wrote")
    try:
        plan = ImagePlan.load(plan_file)
    except ValueError as e:
        raise models.error(str(e)) from e
    pipe = models.pipeline()
    guidance, full_steps = plan.made_for["guidance_scale"], plan.made_for["full_steps"]
    with models.image_run_lock:
        try:
            plan.check(pipe)
            run = planned_pipeline(pipe, plan.settings, guidance)
        except ValueError as e:
            raise models.error(str(e)) from e
        if progress is not None:
            progress(0.0, desc=f"sampling with plan {plan.settings.name}")
        with run.call_context():
            planned, planned_s = _sample(run.pipe, labels, run.steps, guidance, seed)
        depths = torch.tensor(run.depths(count))  # [count, steps]
        timesteps = run.pipe.scheduler.timesteps.clone()
        if progress is not None:
            progress(0.5, desc=f"sampling at full depth, {full_steps} steps")
        full, full_s = _sample(pipe, labels, full_steps, guidance, seed)

    blocks = num_blocks(pipe.transformer)
    cost = float(depths.sum()) / (blocks * full_steps * count)
    counts = torch.zeros(run.steps, blocks, dtype=torch.long)
    for step, column in enumerate(depths.T):
        # A step a cache predicted whole (TaylorSeer) ran no block: it has no column in the heatmap.
        counts[step] += torch.bincount(column[column > 0] - 1, minlength=blocks)
    quality = psnr(planned, full)
    held = plan.figures["held_out"]
    details = {
        "labels": labels, "steps": run.steps, "full_steps": full_steps, "guidance_scale": guidance, "seed": seed,
        "plan": plan.settings.name, "target_psnr": plan.target_psnr, "num_blocks": blocks, "cost": cost,
        "seconds_plan": planned_s, "seconds_full_depth": full_s, "speedup_wall": full_s / planned_s,
        "psnr_db": quality, "plan_held_out": held, "timesteps": timesteps.tolist(), "depth_counts": counts.tolist(),
    }
    verdict = "identical to full depth" if quality is None else f"PSNR {quality:.1f} dB against full depth"
    held_quality = "identical images" if held["psnr"] is None else f"{held['psnr']:.1f} dB"
    planned_for = f"its held-out check: cost {held['layer_ratio']:.3f} at {held_quality}"
    summary = (
        f"**Plan {plan.settings.name}** (target {plan.target_psnr:g} dB; {planned_for}): **cost {cost:.3f}** of full "
        f"depth at {full_steps} steps. Plan {planned_s:.2f} s, full {full_s:.2f} s: **{full_s / planned_s:.2f}x** "
        f"wall-clock. {verdict}."
    )
    figure = depth_heatmap(counts, timesteps, f"plan {plan.settings.name}: cost {cost:.2f}")
    return image_grid(planned), image_grid(full), summary, figure, details
