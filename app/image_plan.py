"""The image plan that ``diffexit calibrate images`` writes: the sampling steps, early exits and feature cache it
chose for a PSNR target, what it was made for, and how a pipeline runs it.

A plan file is JSON::

    {"format": "diffexit-image-plan", "version": 1,
     "settings": {"steps": 10, "exits": {"method": "full"}, "cache": {"kind": "fbc", "threshold": 0.1}},
     "target_psnr": 25.0,
     "made_for": {"pipeline_class", "scheduler", "weights_sha256", "full_steps", "guidance_scale", "pipeline"},
     "figures": {"calibration": {"layer_ratio", "psnr", "samples", "seed"},
                 "held_out": {"layer_ratio", "psnr", "samples", "seed", "met"}},
     "provenance": {"command", ...}}

``settings`` is what to run (:class:`PlanSettings`); ``made_for`` is the model and the reference it was measured
against: PSNR and cost (``layer_ratio``, blocks run over what full depth at ``full_steps`` runs) are against the
same pipeline at full depth and ``full_steps`` steps, from the same noise. :meth:`ImagePlan.check` refuses another
pipeline class, other weights (the SHA-256 of the transformer's state dict at fp16), another full step count or
another guidance scale, each with the fix. :func:`planned_pipeline` sets a copy of a pipeline up to run the settings.

The UEM folder and calibration file the exits name are stored relative to the plan file's folder, so a plan moves
with its folder, beside the SHA-256 of each (``made_for.exit_files_sha256``: the heads' weights file, the calibration
file); :meth:`ImagePlan.load` resolves them against the plan's folder and refuses a file that is missing or whose
digest changed, with the fix. Plans written before this held absolute paths and no digests; they load as before.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..common.results import atomic_write_bytes
from ..uem.calibration_file import weights_digest
from ..uem.exit_config import EarlyExitConfig

FORMAT = "diffexit-image-plan"
VERSION = 1
# diffusers' feature caches a plan can name, by kind, with their parameters: FirstBlockCache's threshold on the
# first block's relative change, TaylorSeer's (one full step in every `interval`, `warmup` full steps first). Both
# decide for a whole batch and keep per-block state of its shape, so neither follows early exits (whose rows leave
# the batch): a plan has one or the other.
CACHES = {"fbc": ("threshold",), "taylorseer": ("interval", "warmup")}
EXIT_FILES = ("uem", "calibration")  # the EarlyExitConfig fields that name files, stored relative to the plan


def exit_file_digest(kind: str, path: Path) -> str:
    """SHA-256 of what an exit's ``kind`` field names: a calibration file's bytes, a UEM folder's heads weights."""
    if kind == "uem":
        from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

        from ..uem.uem_folder import heads_dir

        path = heads_dir(path) / SAFETENSORS_WEIGHTS_NAME
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class PlanSettings:
    """What a plan runs.

    Attributes:
        steps: denoising steps.
        exits: the early exits (``EarlyExitConfig("full")`` for none).
        cache: ``{"kind": "fbc", "threshold": T}`` (diffusers' FirstBlockCache), ``{"kind": "taylorseer",
            "interval": N, "warmup": W}`` (diffusers' TaylorSeer, first order) or None.
    """

    steps: int
    exits: EarlyExitConfig = field(default_factory=EarlyExitConfig)
    cache: Optional[dict] = None

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"a plan's steps must be a whole number >= 1, got {self.steps!r}")
        if not isinstance(self.exits, EarlyExitConfig):
            raise ValueError(f"a plan's exits must be an EarlyExitConfig, got {type(self.exits).__name__}")
        if self.cache is not None:
            kind = self.cache.get("kind") if isinstance(self.cache, dict) else None
            if kind not in CACHES or set(self.cache) != {"kind", *CACHES[kind]}:
                shapes = [{"kind": k, **{p: "..." for p in params}} for k, params in CACHES.items()]
                raise ValueError(f"a plan's cache must be one of {shapes} or null, got {self.cache!r}")
            if kind == "fbc":
                value = self.cache["threshold"]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                        or value <= 0:
                    raise ValueError(f"a plan's fbc threshold must be a finite number > 0, got {value!r}")
            else:
                for name, low in (("interval", 1), ("warmup", 0)):
                    value = self.cache[name]
                    if isinstance(value, bool) or not isinstance(value, int) or value < low:
                        raise ValueError(f"a plan's taylorseer {name} must be a whole number >= {low}, got {value!r}")
            if self.exits.method != "full":
                raise ValueError(f"a plan cannot put the {kind} cache on early exits (it skips blocks that exited rows "
                                 f"never reach); choose one of them")

    @property
    def name(self) -> str:
        """A short name: ``steps-10``, ``steps-10+fbc-0.1``, ``steps-8+deediff-<heads>-cal-0.02-steps8``,
        ``steps-10+static-6+taylor-every3-last1``."""
        parts = [f"steps-{self.steps}"]
        exits = self.exits
        if exits.method != "full":
            if exits.calibration is not None:
                label = "cal-" + Path(exits.calibration).stem.removeprefix("calibration-")
            else:
                label = "-".join("-".join(map(str, v)) if isinstance(v, (list, tuple)) else f"{v}"
                                 for v in exits.params.values())
            parts.append(f"{exits.method}{f'-{Path(exits.uem).name}' if exits.uem else ''}-{label}")
            if exits.remainder != "none":
                parts.append(f"{exits.remainder}-every{exits.refresh_every or 'never'}-last{exits.refresh_last or 0}")
        if self.cache is not None:
            kind = self.cache["kind"]
            parts.append("-".join([kind, *(f"{self.cache[p]:g}" for p in CACHES[kind])]))
        return "+".join(parts)

    def techniques(self, full_steps: int) -> list[str]:
        """The ways of saving compute it joins: ``steps`` (fewer than ``full_steps``), the exit method, a cached
        remainder, the cache."""
        exits = self.exits
        return ((["steps"] if self.steps < full_steps else []) + ([exits.method] if exits.method != "full" else [])
                + ([f"{exits.remainder} remainder"] if exits.remainder != "none" else [])
                + ([self.cache["kind"]] if self.cache is not None else []))

    def to_dict(self) -> dict:
        return {"steps": self.steps, "exits": self.exits.to_dict(), "cache": self.cache}

    @classmethod
    def from_dict(cls, data: dict) -> "PlanSettings":
        if not isinstance(data, dict) or set(data) - {"steps", "exits", "cache"} or "steps" not in data:
            raise ValueError(f"a plan's settings are {{steps, exits?, cache?}}, got {data!r}")
        return cls(data["steps"], EarlyExitConfig.from_dict(data.get("exits", {"method": "full"})), data.get("cache"))


def describe_pipeline(pipe, full_steps: int, guidance_scale: float, pipeline: str) -> dict:
    """What a plan is made for: ``pipe``'s class, scheduler class and transformer digest, the full step count and the
    guidance scale of its reference, and ``pipeline`` (where it was loaded from, for messages)."""
    return {"pipeline_class": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
            "weights_sha256": weights_digest(pipe.transformer), "full_steps": int(full_steps),
            "guidance_scale": float(guidance_scale), "pipeline": pipeline}


@dataclass
class ImagePlan:
    """A plan (see the module docstring for the fields)."""

    settings: PlanSettings
    target_psnr: float
    made_for: dict
    figures: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    @property
    def met(self) -> bool:
        """Whether the held-out check met the target."""
        return bool(self.figures["held_out"]["met"])

    def check(self, pipe, *, full_steps: Optional[int] = None, guidance_scale: Optional[float] = None) -> None:
        """Raise ``ValueError`` unless ``pipe`` (before any exits or caches) is the pipeline this plan was made for and
        ``full_steps`` / ``guidance_scale`` (None: the plan's own) are its reference's."""
        made = self.made_for

        def remake(extra: str = "") -> str:
            steps = "" if full_steps is None else f" --steps {full_steps}"
            return f"make a plan for it with `diffexit calibrate images --psnr {self.target_psnr:g}{steps}{extra}`"

        fix = remake()
        if type(pipe).__name__ != made["pipeline_class"]:
            raise ValueError(f"this plan was made for a {made['pipeline_class']}, not a {type(pipe).__name__}; {fix}")
        if type(pipe.scheduler).__name__ != made["scheduler"]:
            raise ValueError(f"this plan was made for the {made['scheduler']} sampler, not "
                             f"{type(pipe.scheduler).__name__}; {fix}")
        if weights_digest(pipe.transformer) != made["weights_sha256"]:
            raise ValueError(f"this plan was made for other weights ({made['pipeline']}); "
                             f"{remake(' --model DIR')} with DIR this pipeline, or pass the pipeline it was made for")
        if full_steps is not None and full_steps != made["full_steps"]:
            raise ValueError(f"this plan was made against {made['full_steps']} full steps (it samples "
                             f"{self.settings.steps}), not {full_steps}; drop --steps, or {fix}")
        if guidance_scale is not None and float(guidance_scale) != float(made["guidance_scale"]):
            raise ValueError(f"this plan was made for guidance {made['guidance_scale']:g}, not {guidance_scale:g}; "
                             f"drop the guidance scale, or {remake(f' --guidance-scale {guidance_scale:g}')}")

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "settings": self.settings.to_dict(),
                "target_psnr": self.target_psnr, "made_for": self.made_for, "figures": self.figures,
                "provenance": self.provenance}

    def save(self, path) -> Path:
        """Write the plan as JSON to ``path``, atomically, with the exits' files named relative to its folder and
        their digests as they are now."""
        path = Path(path)
        data = self.to_dict()
        exits, digests = data["settings"]["exits"], {}
        for kind in EXIT_FILES:
            if exits.get(kind) is not None:
                named = Path(exits[kind]).resolve()
                digests[kind] = exit_file_digest(kind, named)
                exits[kind] = Path(os.path.relpath(named, path.resolve().parent)).as_posix()
        if digests:
            data["made_for"] = {**data["made_for"], "exit_files_sha256": digests}
        atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())
        return path

    @classmethod
    def load(cls, path) -> "ImagePlan":
        """Read a plan :meth:`save` wrote; anything else is refused with ``ValueError`` naming the file and the fix."""
        path = Path(path)
        fix = "make one with `diffexit calibrate images --psnr DB --out FILE`"
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read an image plan from {path}: {e}; {fix}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not an image plan file; {fix}")
        if data.get("version") != VERSION:
            raise ValueError(f"{path} is a version {data.get('version')} image plan; this diffexit reads version "
                             f"{VERSION}: {fix}")
        missing = [k for k in ("settings", "target_psnr", "made_for") if k not in data]
        if missing:
            raise ValueError(f"{path} lacks {', '.join(missing)}; {fix}")
        lacking = [k for k in ("pipeline_class", "scheduler", "weights_sha256", "full_steps", "guidance_scale",
                               "pipeline") if k not in data["made_for"]]
        if lacking:
            raise ValueError(f"{path}: made_for lacks {', '.join(lacking)}; {fix}")
        held = data.get("figures", {}).get("held_out") if isinstance(data.get("figures"), dict) else None
        if not isinstance(held, dict) or not {"layer_ratio", "psnr", "met"} <= set(held):
            raise ValueError(f"{path} lacks its held-out check (figures.held_out: layer_ratio, psnr, met); {fix}")
        try:
            settings = PlanSettings.from_dict(data["settings"])
        except ValueError as e:
            raise ValueError(f"{path}: {e}; {fix}") from None
        made_for = dict(data["made_for"])
        settings = _resolved(settings, path, made_for.pop("exit_files_sha256", {}), float(data["target_psnr"]))
        return cls(settings, float(data["target_psnr"]), made_for, data["figures"], data.get("provenance", {}))


def _resolved(settings: PlanSettings, path: Path, digests: dict, target: float) -> PlanSettings:
    """``settings`` with the exits' files resolved against the folder of the plan at ``path``, each checked to be
    there and, where the plan records its digest, to be the file the plan was made with."""
    exits, found = settings.exits, {}
    remake = f"make a new plan with `diffexit calibrate images --psnr {target:g} --out {path}`"
    for kind in EXIT_FILES:
        named = getattr(exits, kind)
        if named is None:
            continue
        what = "UEM folder" if kind == "uem" else "calibration file"
        where = (path.parent / named).resolve()  # an absolute path (older plans) stays as it is
        if not where.exists():
            raise ValueError(f"plan {path} names the {what} {named} (relative to the plan's folder), and {where} does "
                             f"not exist; move the plan's folder whole (it names its files relative to itself), or "
                             f"{remake}")
        digest = digests.get(kind)
        if digest is not None and exit_file_digest(kind, where) != digest:
            what = "the UEM weights in" if kind == "uem" else "the calibration file"
            raise ValueError(f"{what} {where} differ from those plan {path} was made with (another SHA-256); put back "
                             f"the files it was made with, or {remake}")
        found[kind] = str(where)
    return dataclasses.replace(settings, exits=dataclasses.replace(exits, **found)) if found else settings


@dataclass
class PlanRun:
    """A pipeline set up for a plan's settings.

    Attributes:
        pipe: a copy of the pipeline given (its own transformer and scheduler), with the exits and cache on.
        steps: denoising steps per call.
        exit_scheduler: the ``ExitAwareScheduler`` when the plan exits early, else None.
        call_context: wraps every call of ``pipe`` (a cache starts afresh in it).
        block_calls: with a cache, blocks run at each transformer call of the last pipeline call, appended by hooks.
    """

    pipe: object
    steps: int
    exit_scheduler: object = None
    call_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    block_calls: list = field(default_factory=list)

    def depths(self, batch: int) -> list[list[int]]:
        """Blocks each of the last call's ``batch`` samples ran at each step, ``[batch][steps]``: the exits' own
        record, the cache's count (one for the whole batch: it skips for all rows together), else every block."""
        from ..uem.block_adapters import num_blocks

        if self.exit_scheduler is not None:
            return self.exit_scheduler.statistics.depths.T.tolist()
        if self.cache_on:
            return [list(self.block_calls)] * batch
        return [[num_blocks(self.pipe.transformer)] * self.steps] * batch

    @property
    def cache_on(self) -> bool:
        return self.call_context is not contextlib.nullcontext


def copy_pipeline(pipe):
    """A pipeline of the same class around deep copies of ``pipe``'s transformer and scheduler, free to hook."""
    components = {**pipe.components, "transformer": copy.deepcopy(pipe.transformer),
                  "scheduler": copy.deepcopy(pipe.scheduler)}
    copied = type(pipe)(**components)
    copied.set_progress_bar_config(disable=True)
    return copied


def planned_pipeline(pipe, settings: PlanSettings, guidance_scale: float) -> PlanRun:
    """A copy of ``pipe`` running ``settings`` (``pipe`` itself is untouched); ``ValueError`` names a setting that does
    not fit (a calibration made for other weights or steps, say)."""
    from ..samplers.early_exits import attach_early_exits

    run = PlanRun(copy_pipeline(pipe), settings.steps)
    if settings.exits.method != "full":
        attach_early_exits(run.pipe, settings.exits, steps=settings.steps, guidance_scale=guidance_scale)
        run.exit_scheduler = run.pipe.scheduler
    if settings.cache is not None:
        run.call_context = _diffusers_cache(run, settings.cache)
    return run


def _diffusers_cache(run: PlanRun, cache: dict) -> Callable[[], contextlib.AbstractContextManager]:
    """Put the diffusers cache ``cache`` names on ``run.pipe.transformer``; returns the context each call runs in.
    Hooks count, per transformer call, the blocks that ran: a block's first norm runs only when the block does (a
    cache replaces a skipped block's forward)."""
    from diffusers.hooks import HookRegistry
    from diffusers.models.cache_utils import CacheMixin

    from ..uem.block_adapters import blocks

    model = run.pipe.transformer
    model.register_forward_pre_hook(lambda module, args: run.block_calls.append(0))

    def count(module, args, output):
        run.block_calls[-1] += 1

    for block in blocks(model):
        block.norm1.register_forward_hook(count)
    if cache["kind"] == "fbc":
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=cache["threshold"]))
    else:
        import re

        import torch
        from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

        # Every block's output, named as the model names its blocks, with float32 factors (bfloat16, the default,
        # costs precision the small digits DiT shows).
        ours = set(blocks(model))
        names = [re.escape(name) for name, module in model.named_modules() if module in ours]
        apply_taylorseer_cache(model, TaylorSeerCacheConfig(
            cache_interval=cache["interval"], disable_cache_before_step=cache["warmup"], max_order=1,
            taylor_factors_dtype=torch.float32, cache_identifiers=names))

    @contextlib.contextmanager
    def call_context() -> Iterator[None]:
        # Neither DiT pipeline names a cache context or resets the cache, so both happen here: each call starts
        # afresh, and one context covers the call because the guided batch holds cond and uncond rows together.
        run.block_calls.clear()
        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)
        with CacheMixin.cache_context(model, "cond"):
            yield

    return call_context
