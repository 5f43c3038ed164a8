"""One door for DeeDiff early exits on a diffusers pipeline, as diffusers' ``apply_*`` functions are for caches.

    config = EarlyExitConfig("deediff", budget=0.02, uem="runs/uem")
    exits = attach_early_exits(pipe, config, steps=25)     # heads, backbone, calibration, rule, hook, scheduler
    images = pipe(labels, num_inference_steps=exits.steps).images
    pipe.scheduler.statistics.layer_ratio                   # what the exits saved (ExitStatistics)
    detach_early_exits(pipe)                                # the pipeline as it was, bit for bit

:func:`attach_early_exits` reads the UEM folder once (heads, and the fine-tuned backbone they were trained with,
which replaces ``pipe.transformer`` unless the pipeline already runs it), finds and checks the calibration a
calibrated rule names, builds the rule once, puts the hook on the transformer
(:func:`~diffexit.uem.early_exit.enable_early_exit`) and wraps the scheduler in an
:class:`~diffexit.samplers.exit_scheduler.ExitAwareScheduler`. :func:`detach_early_exits` undoes each of these:
the pipeline's transformer, scheduler and their forward are the very objects they were before.

This floor holds it because it plugs the engine (``diffexit.uem``) into a diffusers pipeline, scheduler included.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from torch import nn

from ..uem.calibration_file import Calibration, find_calibration
from ..uem.early_exit import EarlyExit, disable_early_exit, enable_early_exit
from ..uem.exit_config import EarlyExitConfig
from ..uem.exit_rules import ExitRule
from ..uem.rule_spec import exit_rule
from ..uem.uem_folder import backbone_dir, load_uem_folder
from .exit_scheduler import ExitAwareScheduler

# What each attached pipeline had before, kept off the pipeline so that detaching leaves nothing of ours on it.
_ATTACHED: "weakref.WeakKeyDictionary[object, AttachedExits]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class AttachedExits:
    """What :func:`attach_early_exits` put on a pipeline.

    Attributes:
        early_exit: the controller on the transformer (swap ``.rule``; ``.last_depths``).
        rule: the exit rule built from the config.
        steps, guidance_scale: the sampling setup the exits were checked for: those given, else a calibration's own;
            None when neither names one.
        transformer, scheduler: the pipeline's own, which :func:`detach_early_exits` puts back.
    """

    early_exit: EarlyExit
    rule: ExitRule
    steps: Optional[int]
    guidance_scale: Optional[float]
    transformer: nn.Module
    scheduler: object


def _loaded_from(model: nn.Module, folder: Path) -> bool:
    """Whether ``model`` was loaded from ``folder`` (``from_pretrained`` records it; a deep copy keeps it)."""
    name = getattr(model.config, "_name_or_path", None)
    return bool(name) and Path(name).resolve() == folder.resolve()


def _calibration_file(config: EarlyExitConfig, heads: Path, steps: Optional[int]) -> Path:
    if config.calibration is not None:
        path = Path(config.calibration)
        if not path.is_file():
            raise ValueError(f"calibration file {path} does not exist; pass a file `diffexit calibrate uem` wrote")
        return path
    try:
        return find_calibration(heads, config.budget, steps)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None


def attach_early_exits(pipe, config: EarlyExitConfig, *, steps: Optional[int] = None,
                       guidance_scale: Optional[float] = None) -> AttachedExits:
    """Put the early exits ``config`` names on ``pipe`` (a diffusers pipeline with a supported ``.transformer``).

    Args:
        pipe: the pipeline; it is called exactly as before.
        config: the exits.
        steps, guidance_scale: the sampling setup, which a calibrated rule is checked against (None: the
            calibration's own); other rules ignore them.

    Raises ``ValueError`` naming the problem and the fix (an unreadable UEM folder, a calibration made for other
    weights or settings, a rule that does not fit the model, exits already attached); the pipeline is then unchanged.
    """
    if not isinstance(config, EarlyExitConfig):
        raise ValueError(f"config must be an EarlyExitConfig, got {type(config).__name__}")
    if pipe in _ATTACHED:
        raise ValueError("early exits are already attached to this pipeline; call detach_early_exits(pipe) first")
    original, scheduler = pipe.transformer, pipe.scheduler
    uem = None
    if config.uem is not None:
        folder = load_uem_folder(config.uem)
        uem = folder.uem
        backbone = backbone_dir(folder.heads)
        if folder.backbone is not None and not _loaded_from(original, backbone):
            tuned = folder.backbone.to(original.device)
            pipe.transformer = tuned if tuned.dtype == original.dtype else tuned.to(original.dtype)
    try:
        if config.calibrated:
            calibration = _calibration_file(config, None if config.uem is None else folder.heads, steps)
            try:
                made = Calibration.load(calibration)
                steps = made.sampler["steps"] if steps is None else steps
                guidance_scale = float(made.sampler["guidance_scale"]) if guidance_scale is None else guidance_scale
                made.checked_rule(pipe.transformer, uem, steps=steps, guidance_scale=guidance_scale,
                                  scheduler=type(scheduler).__name__)
                rule = exit_rule(config.method, config.params, made)
            except ValueError as e:
                raise ValueError(f"{calibration}: {e}") from None
        else:
            rule = exit_rule(config.method, config.params)
        try:
            early_exit = enable_early_exit(pipe, uem, rule, remainder=config.cached_remainder())
        except ValueError as e:
            raise ValueError(f"method {config.method!r} does not fit this model: {e}") from None
    except ValueError:
        pipe.transformer = original
        raise
    pipe.scheduler = ExitAwareScheduler(scheduler, early_exit)
    attached = AttachedExits(early_exit, rule, steps, guidance_scale, original, scheduler)
    _ATTACHED[pipe] = attached
    return attached


def detach_early_exits(pipe) -> None:
    """Take off what :func:`attach_early_exits` put on ``pipe``: its transformer, scheduler and their ``forward``
    are the ones it had before, so it samples bit for bit as if never attached."""
    attached = _ATTACHED.pop(pipe, None)
    if attached is None:
        raise ValueError("no early exits are attached to this pipeline (attach_early_exits puts them on)")
    disable_early_exit(pipe.transformer)
    pipe.scheduler = attached.scheduler
    if pipe.transformer is not attached.transformer:
        pipe.transformer = attached.transformer
