"""Per-step exit thresholds, and minimum depths, that keep the exit error within a budget.

**Exit error.** At sampling step ``s`` the sampler moves the state ``x_s`` to ``x_{s+1} = step(g, t_s, x_s)``, where
``g`` is the model's noise prediction (guided, ``g_u + w (g_c - g_u)``, when ``w > 1``). Exiting after block ``k``
replaces ``g`` by ``g_k``, the output head's prediction after that block. The exit error of one sample is

    e_s(k) = mean over pixels and channels of |step(g_k, t_s, x_s) - step(g_L, t_s, x_s)|

in the units of the sampler's state (pixels in ``[-1, 1]`` for the digits DiT): how far exiting moves the next state.
It is measured in the next state rather than on the noise prediction because the same noise error moves the state
by very different amounts at different steps: under the digits DiT's DDIM schedule (cosine, 50 steps), six times
more at ``t = 899`` than at ``t = 99``, and far more still at ``t = 999``. In the next state, errors at every step
are in one unit, and a sample's final deviation is about their sum when the sampler neither damps nor amplifies
them. The **budget** is a bound on the mean of ``e_s`` over samples, at every step, in those units.

**Procedure.**

1. *Record.* Sample seeded noise with round-robin digit labels at full depth. At every step run every exit once
   (:func:`~diffexit.uem.early_exit.exit_predictions`) and keep, per sample and block, the uncertainty the
   early-exit forward would compare with a threshold (mean over tokens, the larger of a guided pair's two rows)
   and ``e_s(k)``. A second set of samples from another seed is recorded the same way and held out.
2. *Path.* For each step, a path of rules ``(m, tau)`` (stop after the first block ``k >= m`` with uncertainty
   below ``tau``), from full depth to the most permissive rule. Each move lowers ``m`` by one or raises ``tau`` to
   the next candidate (quantiles of that step's uncertainties) that changes some sample's depth, whichever adds
   less mean error per block saved. Either move can only make a sample stop at the same block or earlier,
   whatever its uncertainties. With ``--min-depth N`` the minimum depth is fixed and only ``tau`` moves.
3. *Budget.* Per step, the last rule on the path before the mean exit error of the calibration samples first
   exceeds the budget. The path does not depend on the budget, so a larger budget stops further along it:
   minimum depths never rise and thresholds never fall, and no sample, on any input, runs more blocks.
4. *Held out.* The chosen rules' mean exit error and blocks on the held-out recording, per step.

The result, per budget, is what :class:`~diffexit.uem.calibration_file.Calibration` saves as JSON beside the UEM
weights, with the model's and the UEMs' shapes and weight digests; its ``checked_rule`` refuses other weights, and
another sampler, step count or guidance scale than those recorded. The command is ``diffexit.app.calibrate_uem``.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

from .calibration_file import Calibration, weights_digest
from .early_exit import exit_predictions
from .heads import UEMStack, describe_model

# Candidate thresholds per step: quantiles of that step's uncertainties. Finer grids move the chosen thresholds by
# less than the spread between neighbouring samples' uncertainties.
GRID = 256


class ExitRecord(NamedTuple):
    """What every exit would have done along full-depth sampling runs.

    ``uncertainty[s, k - 1, i]``: sample ``i``'s statistic after block ``k`` at step ``s`` (its mean UEM output, or
    for a similarity exit the relative change block ``k`` made), as the early-exit forward compares it with a
    threshold; ``error[s, k - 1, i]``: its exit error ``e_s(k)`` (zero at ``k = L``).
    Both float32 ``[S, L, n]``.
    """

    uncertainty: torch.Tensor
    error: torch.Tensor


def _step_kwargs(scheduler, seed: int) -> dict:
    # A stochastic sampler draws the same noise for every exit, so the exit error is the prediction's alone.
    if "generator" in inspect.signature(scheduler.step).parameters:
        return {"generator": torch.Generator().manual_seed(seed)}
    return {}


@torch.no_grad()
def record_exits(transformer: nn.Module, uem: Optional[UEMStack], scheduler, labels: torch.Tensor, *, steps: int,
                 guidance_scale: float, seed: int, batch_size: int = 64,
                 statistic: str = "uncertainty") -> ExitRecord:
    """Sample ``labels`` at full depth with ``scheduler`` and record every exit at every step.

    ``statistic`` is what a rule will compare with its thresholds (:mod:`~diffexit.uem.exit_rules`): the UEMs'
    mean uncertainty, or ``"change"``, the relative change each block makes (MuE's similarity exit; ``uem`` may then
    be ``None``). The record keeps it in its ``uncertainty`` field.

    The loop is :class:`~diffexit.uem.pipeline.DigitsDiTPipeline`'s (``[cond; uncond]`` halves when
    ``guidance_scale > 1``, the null class ``transformer.config.num_embeds_ada_norm``). The initial noise of all
    samples is one draw from a generator seeded ``seed``. ``scheduler`` is stepped in place.

    Returns:
        :class:`ExitRecord` with ``S = steps`` and ``n = len(labels)``.
    """
    if statistic not in ("uncertainty", "change"):
        raise ValueError(f"unknown statistic {statistic!r}; choose 'uncertainty' or 'change'")
    if statistic == "uncertainty" and uem is None:
        raise ValueError("the uncertainty statistic reads the UEMs: pass uem, or record statistic='change'")
    device = next(transformer.parameters()).device
    size, channels = transformer.config.sample_size, transformer.config.in_channels
    noise = torch.randn(len(labels), channels, size, size, generator=torch.Generator().manual_seed(seed))
    guided = guidance_scale > 1
    uncertainty, error = [], []
    for start in range(0, len(labels), batch_size):
        x = noise[start:start + batch_size].to(device)
        y = labels[start:start + batch_size].to(device)
        if guided:
            y = torch.cat([y, torch.full_like(y, transformer.config.num_embeds_ada_norm)])
        scheduler.set_timesteps(steps, device=device)
        u_steps, e_steps = [], []
        for s, t in enumerate(scheduler.timesteps):
            model_input = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
            out = exit_predictions(transformer, uem, model_input, timestep=t.reshape(-1).expand(len(model_input)),
                                   class_labels=y, backbone_grad=False)
            # A learned-sigma model (out_channels = 2 * in_channels, every public DiT checkpoint) appends its
            # variance; the sampler steps the noise half, as DiTPipeline does.
            eps = out.sample[:, :, :channels]  # [L, rows, C, H, W]
            u = out.change.float() if statistic == "change" else out.uncertainty.float().mean(-1)  # [L, rows]
            if guided:
                cond, uncond = eps.chunk(2, dim=1)
                eps = uncond + guidance_scale * (cond - uncond)
                u = torch.maximum(*u.chunk(2, dim=1))
            step_seed = seed * 1_000_003 + s
            # Each exit steps its own copy of the scheduler: multistep samplers keep a history that one step changes.
            exits = [copy.deepcopy(scheduler).step(e, t, x, **_step_kwargs(scheduler, step_seed)).prev_sample
                     for e in eps[:-1]]
            x = scheduler.step(eps[-1], t, x, **_step_kwargs(scheduler, step_seed)).prev_sample
            exits.append(x)
            e_steps.append(torch.stack([(e - x).abs().flatten(1).mean(1) for e in exits]).float().cpu())
            u_steps.append(u.cpu())
        uncertainty.append(torch.stack(u_steps))
        error.append(torch.stack(e_steps))
    return ExitRecord(torch.cat(uncertainty, -1), torch.cat(error, -1))


def exit_outcome(uncertainty: torch.Tensor, error: torch.Tensor, min_depth: int,
                 threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks run and exit error of each sample under the rule ``(min_depth, threshold)`` at one step.

    Args:
        uncertainty, error: ``[L, n]``, one step of an :class:`ExitRecord`.

    Returns:
        ``(depth int64 [n], error float [n])``.
    """
    blocks, n = uncertainty.shape
    k = torch.arange(1, blocks, device=uncertainty.device)[:, None]
    stops = (k >= min_depth) & (uncertainty[:-1] < threshold)
    depth = torch.where(stops.any(0), stops.to(torch.uint8).argmax(0) + 1, blocks)
    return depth, error[depth - 1, torch.arange(n)]


@dataclass(frozen=True)
class PathPoint:
    """One rule on a step's path, with its mean exit error and mean blocks on the calibration samples."""

    min_depth: int
    threshold: float
    error: float
    depth: float


def exit_path(uncertainty: torch.Tensor, error: torch.Tensor, min_depth: Optional[int] = None,
              grid: int = GRID) -> list[PathPoint]:
    """The path of rules for one step, from full depth to the most permissive (see the module docstring).

    Args:
        uncertainty, error: ``[L, n]``, one step of an :class:`ExitRecord`.
        min_depth: a fixed minimum depth in ``[1, L]``, or ``None`` to move it along the path too.
        grid: at most this many candidate thresholds (quantiles of ``uncertainty[:-1]``), plus ``0``.
    """
    blocks = uncertainty.shape[0]
    if min_depth is not None and not 1 <= min_depth <= blocks:
        raise ValueError(f"min_depth must be in [1, {blocks}], got {min_depth}")
    u = uncertainty[:-1].float()
    levels = torch.linspace(0, 1, min(grid, u.numel()))
    # Candidates sit just above quantiles, in float32 (the precision the rule compares in), so that the sample at a
    # quantile stops (``u < tau``).
    above = torch.nextafter(torch.quantile(u.flatten(), levels), torch.tensor(float("inf")))
    taus = torch.unique(above.clamp(max=1.0))
    lowest = 1 if min_depth is None else min_depth
    k = torch.arange(1, blocks)[:, None]

    def point(m, tau):
        depth, err = exit_outcome(uncertainty, error, m, tau)
        return depth, PathPoint(m, tau, float(err.double().mean()), float(depth.double().mean()))

    depth, here = point(max(blocks - 1, 1) if min_depth is None else min_depth, 0.0)
    path = [here]
    while True:
        # Only moves that change some sample's depth: one that changes none now can still be taken later.
        m, tau, moves = here.min_depth, here.threshold, []
        live = (k >= m) & (k < depth)  # blocks where a sample could still stop earlier at this minimum depth
        if live.any():
            i = int(torch.searchsorted(taus, u[live].min(), right=True))
            if i < len(taus):
                moves.append((m, float(taus[i])))
        lower = [d for d in range(m - 1, lowest - 1, -1) if bool((u[d - 1] < tau).any())]
        if lower:
            moves.append((lower[0], tau))
        if not moves:
            if m == lowest:
                return path
            # Every sample stops at m and none would at m - 1 under this threshold: lower m so tau can move on.
            moves.append((m - 1, tau))
        best = None
        for move in moves:  # the threshold move first: on a tie, it keeps the deeper minimum
            cand_depth, cand = point(*move)
            saved = here.depth - cand.depth
            score = (cand.error - here.error) / saved if saved > 0 else 0.0
            if best is None or score < best[0]:
                best = (score, cand_depth, cand)
        _, depth, here = best
        path.append(here)


def within_budget(path: Sequence[PathPoint], budget: float) -> PathPoint:
    """The last point of ``path`` before its mean exit error first exceeds ``budget`` (the first point is full
    depth, whose error is zero)."""
    chosen = path[0]
    for p in path:
        if p.error > budget:
            break
        chosen = p
    return chosen


def calibrate(record: ExitRecord, budgets: Sequence[float], min_depth: Optional[int] = None,
              held_out: Optional[ExitRecord] = None) -> list[dict]:
    """Per-step rules for each budget, from one recording.

    Returns, per budget (in the order given): ``{"budget", "thresholds", "min_depths", "figures"}``, where
    ``figures`` holds the per-step mean exit error and mean blocks on ``record`` (and on ``held_out``), and their
    layer ratio (blocks run over blocks available).
    """
    steps, blocks, _ = record.uncertainty.shape
    paths = [exit_path(record.uncertainty[s], record.error[s], min_depth) for s in range(steps)]
    out = []
    for budget in budgets:
        chosen = [within_budget(path, budget) for path in paths]
        figures = {"calibration": _measure(record, chosen)}
        if held_out is not None:
            figures["held_out"] = _measure(held_out, chosen)
        out.append({"budget": budget, "thresholds": [p.threshold for p in chosen],
                    "min_depths": [p.min_depth for p in chosen], "figures": figures})
    return out


def _measure(record: ExitRecord, chosen: Sequence[PathPoint]) -> dict:
    blocks = record.uncertainty.shape[1]
    errors, depths = [], []
    for s, p in enumerate(chosen):
        depth, err = exit_outcome(record.uncertainty[s], record.error[s], p.min_depth, p.threshold)
        errors.append(float(err.double().mean()))
        depths.append(float(depth.double().mean()))
    return {"samples": record.uncertainty.shape[2], "error_per_step": errors, "depth_per_step": depths,
            "max_error": max(errors), "layer_ratio": sum(depths) / (blocks * len(depths))}


def calibrate_similarity(transformer: nn.Module, scheduler, labels: torch.Tensor, held_out: torch.Tensor, *,
                         budgets: Sequence[float], steps: int, guidance_scale: float, seed: int,
                         min_depth: Optional[int] = None) -> list[Calibration]:
    """Per-step tolerances for MuE's similarity exit, one :class:`Calibration` per budget: the procedure above on
    the relative change each block makes instead of the UEMs' uncertainty (no heads involved).

    ``labels`` are recorded from noise seeded ``seed``, ``held_out`` from ``seed + 1``; the files' ``uem`` is empty
    and their ``statistic`` is ``"change"``, so they check the model's weights and the sampling setup only.
    """
    kw = dict(steps=steps, guidance_scale=guidance_scale, statistic="change")
    record = record_exits(transformer, None, copy.deepcopy(scheduler), labels, seed=seed, **kw)
    held = record_exits(transformer, None, copy.deepcopy(scheduler), held_out, seed=seed + 1, **kw)
    model = {**describe_model(transformer), "weights_sha256": weights_digest(transformer)}
    sampler = {"scheduler": type(scheduler).__name__, "steps": steps, "guidance_scale": guidance_scale}
    provenance = {"command": "diffexit.uem.calibration.calibrate_similarity", "seed": seed, "samples": len(labels),
                  "held_out": len(held_out), "min_depth": "auto" if min_depth is None else min_depth}
    return [Calibration(r["budget"], r["thresholds"], r["min_depths"], model, {}, sampler, r["figures"], provenance,
                        statistic="change") for r in calibrate(record, budgets, min_depth, held)]
