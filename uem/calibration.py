"""``diffexit calibrate uem``: per-step exit thresholds, and minimum depths, that keep the exit error within a budget.

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

The result is a :class:`Calibration`, saved as JSON beside the UEM weights (``calibration-<budget>.json``, or
``calibration-<budget>-min<N>.json`` with a fixed minimum depth ``N``), with the
model's and the UEMs' shapes and weight digests; :meth:`CalibratedThreshold.from_file
<diffexit.uem.exit_rules.CalibratedThreshold.from_file>` refuses a file made for other weights. The thresholds hold
for the sampler, step count and guidance scale recorded in the file.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import json
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

from ..app.reporting import atomic_write_bytes
from .exit_rules import CalibratedThreshold
from .heads import UEMStack, describe_model

FORMAT = "diffexit-uem-calibration"
VERSION = 1
# Candidate thresholds per step: quantiles of that step's uncertainties. Finer grids move the chosen thresholds by
# less than the spread between neighbouring samples' uncertainties.
GRID = 256


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state dict, compared at fp16 precision so that a copy cast to fp16 still matches."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return h.hexdigest()


class ExitRecord(NamedTuple):
    """What every exit would have done along full-depth sampling runs.

    ``uncertainty[s, k - 1, i]``: sample ``i``'s mean UEM output after block ``k`` at step ``s``, as the early-exit
    forward compares it with a threshold; ``error[s, k - 1, i]``: its exit error ``e_s(k)`` (zero at ``k = L``).
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
def record_exits(transformer: nn.Module, uem: UEMStack, scheduler, labels: torch.Tensor, *, steps: int,
                 guidance_scale: float, seed: int, batch_size: int = 64) -> ExitRecord:
    """Sample ``labels`` at full depth with ``scheduler`` and record every exit at every step.

    The loop is :class:`~diffexit.uem.pipeline.DigitsDiTPipeline`'s (``[cond; uncond]`` halves when
    ``guidance_scale > 1``, the null class ``transformer.config.num_embeds_ada_norm``). The initial noise of all
    samples is one draw from a generator seeded ``seed``. ``scheduler`` is stepped in place.

    Returns:
        :class:`ExitRecord` with ``S = steps`` and ``n = len(labels)``.
    """
    from .early_exit import exit_predictions

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
            eps, u = out.sample, out.uncertainty.float().mean(-1)  # [L, rows, C, H, W], [L, rows]
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


@dataclass
class Calibration:
    """Per-step thresholds and minimum depths for one budget, and what they were made for.

    Attributes:
        budget: the bound on the mean exit error per step (units: see the module docstring).
        thresholds, min_depths: one per sampling step (:class:`~diffexit.uem.exit_rules.CalibratedThreshold`).
        model: ``describe_model(transformer)`` plus ``weights_sha256``.
        uem: the UEMs' ``target`` and ``weights_sha256``.
        sampler: ``scheduler`` (class name), ``steps`` and ``guidance_scale`` of the recording.
        figures: what the calibration measured (mean exit error and blocks per step, on the calibration and the
            held-out samples).
        provenance: ``command``, ``seed``, ``samples``, ``held_out`` and ``min_depth`` of the run.
    """

    budget: float
    thresholds: list[float]
    min_depths: list[int]
    model: dict
    uem: dict
    sampler: dict
    figures: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def rule(self) -> CalibratedThreshold:
        """The exit rule these thresholds define."""
        return CalibratedThreshold(self.thresholds, self.min_depths, budget=self.budget)

    def check_matches(self, transformer: nn.Module, uem: UEMStack) -> None:
        """Raise ``ValueError`` unless ``transformer`` and ``uem`` are the ones this calibration was made for."""
        fix = "calibrate these weights with `diffexit calibrate uem`, or load the UEMs and model it was made for"
        got = describe_model(transformer)
        want = {k: self.model[k] for k in got}
        if want != got:
            raise ValueError(f"this calibration was made for a {want['model_class']} with {want['num_blocks']} "
                             f"blocks of width {want['hidden_size']}, but the model is a {got['model_class']} with "
                             f"{got['num_blocks']} blocks of width {got['hidden_size']}; {fix}")
        uem.check_matches(transformer)
        if uem.config.target != self.uem["target"]:
            raise ValueError(f"this calibration was made for UEMs trained on the {self.uem['target']!r} target, "
                             f"but these were trained on {uem.config.target!r}; {fix}")
        if weights_digest(transformer) != self.model["weights_sha256"]:
            raise ValueError(f"the model's weights differ from those this calibration was made for (a retrained or "
                             f"fine-tuned model?); {fix}")
        if weights_digest(uem) != self.uem["weights_sha256"]:
            raise ValueError(f"the UEM weights differ from those this calibration was made for (retrained UEMs?); "
                             f"{fix}")

    def check_setup(self, steps: int, guidance_scale: float, scheduler: str) -> None:
        """Raise ``ValueError`` unless sampling uses the setup the thresholds were chosen for: ``steps`` steps of the
        scheduler class named ``scheduler`` at ``guidance_scale``."""
        made_for = self.sampler
        if (made_for["steps"], float(made_for["guidance_scale"]), made_for["scheduler"]) != (
                steps, float(guidance_scale), scheduler):
            raise ValueError(
                f"the budget-{self.budget:g} calibration was made for {made_for['steps']} steps of "
                f"{made_for['scheduler']} at guidance {made_for['guidance_scale']:g}, not {steps} of {scheduler} at "
                f"{guidance_scale:g}; sample with those settings, or calibrate for yours with `diffexit calibrate uem "
                f"--steps {steps} --guidance-scale {guidance_scale:g}`"
            )

    def checked_rule(self, transformer: nn.Module, uem: UEMStack, *, steps: int, guidance_scale: float,
                     scheduler: str) -> CalibratedThreshold:
        """The exit rule, once :meth:`check_matches` and :meth:`check_setup` have passed (``ValueError`` if not)."""
        self.check_matches(transformer, uem)
        self.check_setup(steps, guidance_scale, scheduler)
        return self.rule()

    def save(self, path) -> Path:
        """Write the calibration as JSON to ``path``."""
        payload = {"format": FORMAT, "version": VERSION, **asdict(self)}
        atomic_write_bytes(Path(path), (json.dumps(payload, indent=2) + "\n").encode())
        return Path(path)

    @classmethod
    def load(cls, path) -> "Calibration":
        """Read a calibration written by :meth:`save`; a file of another kind is refused with ``ValueError``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read a UEM calibration from {path}: {err}") from err
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a UEM calibration file; make one with `diffexit calibrate uem`")
        if data.get("version") != VERSION:
            raise ValueError(f"{path} is a version {data.get('version')} calibration; this diffexit reads version "
                             f"{VERSION}: calibrate again with `diffexit calibrate uem`")
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        missing = [k for k in ("budget", "thresholds", "min_depths", "model", "uem", "sampler") if k not in fields]
        if missing:
            raise ValueError(f"{path} lacks {', '.join(missing)}; calibrate again with `diffexit calibrate uem`")
        calibration = cls(**fields)
        calibration.rule()  # validates thresholds and depths
        return calibration


def calibration_path(directory, budget: float, min_depth: Optional[int] = None) -> Path:
    """Where ``diffexit calibrate uem`` saves the calibration for ``budget`` beside UEM weights in ``directory``:
    ``calibration-<budget>.json`` with minimum depths chosen per step, ``calibration-<budget>-min<N>.json`` with
    ``min_depth`` fixed at ``N``."""
    suffix = "" if min_depth is None else f"-min{min_depth}"
    return Path(directory) / f"calibration-{budget:g}{suffix}.json"


def calibrations_in(directory) -> list[Path]:
    """The calibration files saved beside the UEM weights in ``directory``: chosen minimum depths first, then
    fixed ones by depth, each by budget."""
    def key(path):
        c = Calibration.load(path)
        fixed = c.provenance.get("min_depth", "auto")
        return (fixed != "auto", 0 if fixed == "auto" else int(fixed), c.budget)

    return sorted(Path(directory).glob("calibration-*.json"), key=key)


def calibration_label(path) -> str:
    """What names a calibration file in rows and menus: ``"0.02"`` for ``calibration-0.02.json``, ``"0.02-min3"``
    for ``calibration-0.02-min3.json``."""
    return Path(path).stem.removeprefix("calibration-")


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


def _load_model(model_dir: Optional[str]):
    """``(transformer, sampling scheduler, model dir)``: a pipeline directory's own scheduler, or for a bare
    transformer directory (a full fine-tune's ``transformer/``) the embedded digits pipeline's."""
    import diffusers
    from diffusers import DiTTransformer2DModel

    from .embedded import DIT_COMMAND, DIT_DIR

    path = Path(model_dir) if model_dir else DIT_DIR
    if (path / "model_index.json").is_file():
        transformer_dir, scheduler_dir = path / "transformer", path / "scheduler"
    elif (path / "config.json").is_file():
        transformer_dir, scheduler_dir = path, DIT_DIR / "scheduler"
    elif model_dir is None:
        raise ValueError(f"the embedded digits DiT is missing from {DIT_DIR}; make it with `{DIT_COMMAND}`, or "
                         f"pass --model")
    else:
        raise ValueError(f"{path} is neither a diffusers pipeline directory (model_index.json) nor a model "
                         f"directory (config.json)")
    if not (scheduler_dir / "scheduler_config.json").is_file():
        raise ValueError(f"no sampling scheduler at {scheduler_dir}; pass a pipeline directory as --model")
    class_name = json.loads((transformer_dir / "config.json").read_text()).get("_class_name")
    if class_name != "DiTTransformer2DModel":
        raise ValueError(f"`diffexit calibrate uem` samples a class-conditional DiTTransformer2DModel; "
                         f"{transformer_dir} holds a {class_name}")
    transformer = DiTTransformer2DModel.from_pretrained(transformer_dir, dtype=torch.float32).eval()
    scheduler_class = json.loads((scheduler_dir / "scheduler_config.json").read_text())["_class_name"]
    scheduler = getattr(diffusers, scheduler_class).from_pretrained(scheduler_dir)
    return transformer, scheduler, path


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--uem", required=True, help="directory of the UEM weights (UEMStack.save_pretrained); the "
                                                "calibrations are saved there unless --out says otherwise")
    p.add_argument("--budget", type=float, nargs="+", required=True,
                   help="bound(s) on the mean exit error per step, in the sampler's state units (pixels in [-1, 1] "
                        "for the digits DiT); one file per budget")
    p.add_argument("--model", default=None,
                   help="a DiT pipeline directory, or a bare DiTTransformer2DModel directory (sampled with the "
                        "embedded pipeline's scheduler); default: the embedded digits DiT")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (as the pipeline will use them)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance weight (default: the pipeline's default)")
    p.add_argument("--min-depth", nargs="+", default=["auto"],
                   help="'auto': choose a minimum depth per step along with the threshold; N >= 1: a fixed minimum "
                        "at every step (1: none). Several values calibrate each from the same recording")
    p.add_argument("--samples", type=int, default=128, help="calibration samples (digit labels round-robin)")
    p.add_argument("--held-out", type=int, default=128, help="held-out samples measured with the chosen rules")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="noise seed of the calibration samples (held out: seed + 1)")
    p.add_argument("--out", default=None, help="directory for the calibration files (default: --uem)")
    return p


def _check_args(args) -> list[Optional[int]]:
    """Validate the arguments; return the minimum-depth modes (an int for a fixed depth, None for 'auto')."""
    for name in ("steps", "samples", "held_out", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    bad = [b for b in args.budget if not b > 0]
    if bad:
        raise ValueError(f"--budget must be > 0, got {bad[0]}")
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


def main(argv: list[str], prog: str = "diffexit calibrate uem") -> int:
    parser = _parser(prog)
    args = parser.parse_args(argv)
    from .digits import NUM_CLASSES
    from .train_backbone import inspect_default_guidance

    try:
        modes = _check_args(args)
        transformer, scheduler, model_dir = _load_model(args.model)
        uem = UEMStack.from_pretrained(args.uem).eval()
        uem.check_matches(transformer)
        blocks = uem.config.num_blocks
        deepest = max((m for m in modes if m is not None), default=0)
        if deepest > blocks:
            raise ValueError(f"--min-depth {deepest} exceeds the model's {blocks} blocks")
    except (OSError, ValueError) as err:
        parser.error(str(err))
    guidance = inspect_default_guidance() if args.guidance_scale is None else args.guidance_scale
    device = "cuda" if torch.cuda.is_available() else "cpu"
    transformer.to(device)
    uem.to(device)

    def labels(n):
        return torch.arange(n) % NUM_CLASSES

    kw = dict(steps=args.steps, guidance_scale=guidance, batch_size=args.batch_size)
    print(f"{prog}: recording {args.samples} calibration and {args.held_out} held-out samples at full depth "
          f"({args.steps} steps, guidance {guidance:g}, {type(scheduler).__name__})", file=sys.stderr)
    record = record_exits(transformer, uem, scheduler, labels(args.samples), seed=args.seed, **kw)
    held_out = record_exits(transformer, uem, scheduler, labels(args.held_out), seed=args.seed + 1, **kw)

    model = {**describe_model(transformer), "weights_sha256": weights_digest(transformer), "path": str(model_dir)}
    uem_info = {"target": uem.config.target, "weights_sha256": weights_digest(uem), "path": str(args.uem)}
    sampler = {"scheduler": type(scheduler).__name__, "steps": args.steps, "guidance_scale": guidance}
    out_dir = Path(args.out) if args.out else Path(args.uem)
    print("| min depth | budget | layer ratio (cal) | layer ratio (held out) | mean error (held out) | "
          "worst step (held out) | file |\n|---|---|---|---|---|---|---|")
    for mode in modes:
        provenance = {"command": f"{prog} {shlex.join(argv)}", "seed": args.seed, "samples": args.samples,
                      "held_out": args.held_out, "min_depth": "auto" if mode is None else mode}
        for r in calibrate(record, sorted(args.budget), mode, held_out):
            calibration = Calibration(r["budget"], r["thresholds"], r["min_depths"], model, uem_info, sampler,
                                      r["figures"], provenance)
            path = calibration.save(calibration_path(out_dir, r["budget"], mode))
            cal, held = r["figures"]["calibration"], r["figures"]["held_out"]
            mean_err = sum(held["error_per_step"]) / len(held["error_per_step"])
            print(f"| {provenance['min_depth']} | {r['budget']:g} | {cal['layer_ratio']:.3f} | "
                  f"{held['layer_ratio']:.3f} | {mean_err:.5f} | {held['max_error']:.5f} | {path} |")
    return 0
