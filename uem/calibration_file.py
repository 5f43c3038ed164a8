"""The calibration file that ``diffexit calibrate uem`` writes beside UEM weights, and how a rule comes out of it.

A :class:`Calibration` holds per-step thresholds and minimum depths for one exit-error budget, and what they were
made for: the model's and the UEMs' shapes and weight digests, and the sampler, step count and guidance scale of the
recording. :meth:`Calibration.checked_rule` gives the exit rule only for the weights and the sampling setup it was
made for. Files are named ``calibration-<budget>.json`` (``calibration-<budget>-min<N>.json`` with a fixed minimum
depth ``N``); :func:`find_calibration` looks one up by budget. The algorithm that fills them is
:mod:`diffexit.uem.calibration`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..common.results import atomic_write_bytes
from .exit_rules import CalibratedThreshold
from .heads import UEMStack, describe_model

FORMAT = "diffexit-uem-calibration"
VERSION = 1


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state dict, compared at fp16 precision so that a copy cast to fp16 still matches."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return h.hexdigest()


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
        statistic: what the thresholds bound: ``"uncertainty"`` (the UEMs') or ``"change"`` (a similarity exit's
            relative change; ``uem`` is then empty and no heads are checked).
    """

    budget: float
    thresholds: list[float]
    min_depths: list[int]
    model: dict
    uem: dict
    sampler: dict
    figures: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    statistic: str = "uncertainty"

    def rule(self) -> CalibratedThreshold:
        """The exit rule these thresholds define."""
        return CalibratedThreshold(self.thresholds, self.min_depths, budget=self.budget, statistic=self.statistic)

    def check_matches(self, transformer: nn.Module, uem: Optional[UEMStack]) -> None:
        """Raise ``ValueError`` unless ``transformer`` and ``uem`` are the ones this calibration was made for
        (``uem`` is ``None`` for a similarity calibration, which reads no heads)."""
        fix = "calibrate these weights with `diffexit calibrate uem`, or load the UEMs and model it was made for"
        got = describe_model(transformer)
        want = {k: self.model[k] for k in got}
        if want != got:
            raise ValueError(f"this calibration was made for a {want['model_class']} with {want['num_blocks']} "
                             f"blocks of width {want['hidden_size']}, but the model is a {got['model_class']} with "
                             f"{got['num_blocks']} blocks of width {got['hidden_size']}; {fix}")
        if self.statistic == "change":
            if weights_digest(transformer) != self.model["weights_sha256"]:
                raise ValueError(f"the model's weights differ from those this similarity calibration was made for; "
                                 f"calibrate these weights again (diffexit.uem.calibration)")
            return
        if uem is None:
            raise ValueError("this calibration bounds the UEMs' uncertainty: load the UEMs it was made for")
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

    def matched_rule(self, transformer: nn.Module, uem: Optional[UEMStack]) -> CalibratedThreshold:
        """The exit rule, once :meth:`check_matches` has passed (``ValueError`` if not)."""
        self.check_matches(transformer, uem)
        return self.rule()

    def checked_rule(self, transformer: nn.Module, uem: Optional[UEMStack], *, steps: int, guidance_scale: float,
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


# The step count of a calibration file named by its budget alone; other step counts carry a ``-steps<N>`` suffix.
CALIBRATION_STEPS = 25


def calibration_path(directory, budget: float, min_depth: Optional[int] = None, steps: int = CALIBRATION_STEPS) -> Path:
    """Where ``diffexit calibrate uem`` saves the calibration for ``budget`` beside UEM weights in ``directory``:
    ``calibration-<budget>.json`` with minimum depths chosen per step, ``calibration-<budget>-min<N>.json`` with
    ``min_depth`` fixed at ``N``; either with ``-steps<S>`` before ``.json`` when made for ``steps`` other than
    :data:`CALIBRATION_STEPS`."""
    suffix = ("" if min_depth is None else f"-min{min_depth}") + (
        "" if steps == CALIBRATION_STEPS else f"-steps{steps}")
    return Path(directory) / f"calibration-{budget:g}{suffix}.json"


def calibrations_in(directory) -> list[Path]:
    """The calibration files saved beside the UEM weights in ``directory``: those for the default
    ``CALIBRATION_STEPS`` first (what a menu opening at that step count can run), then by step count; within
    each, chosen minimum depths first, then fixed ones by depth, each by budget."""
    def key(path):
        c = Calibration.load(path)
        fixed = c.provenance.get("min_depth", "auto")
        steps = c.sampler.get("steps", CALIBRATION_STEPS)
        return (steps != CALIBRATION_STEPS, steps, fixed != "auto", 0 if fixed == "auto" else int(fixed), c.budget)

    return sorted(Path(directory).glob("calibration-*.json"), key=key)


def calibration_label(path) -> str:
    """What names a calibration file in rows and menus: ``"0.02"`` for ``calibration-0.02.json``, ``"0.02-min3"``
    for ``calibration-0.02-min3.json``."""
    return Path(path).stem.removeprefix("calibration-")


def find_calibration(directory, budget, steps: Optional[int] = None) -> Path:
    """The calibration file for ``budget`` (a number, or a label such as ``"0.02-min3"``) beside the UEMs in
    ``directory``, made for ``steps`` sampling steps. Without ``steps``: the file the label names, else the only
    file for that budget at any step count. ``FileNotFoundError`` lists the files that are there, and the command that
    makes one."""
    given = label = budget if isinstance(budget, str) else f"{float(budget):g}"
    other_steps = steps is not None and steps != CALIBRATION_STEPS
    if other_steps and "-steps" not in label:
        label += f"-steps{steps}"
    path = Path(directory) / f"calibration-{label}.json"
    if path.is_file():
        return path
    found = [calibration_label(p) for p in sorted(Path(directory).glob("calibration-*.json"))]
    if steps is None:
        any_steps = [f for f in found if re.fullmatch(re.escape(label) + r"-steps\d+", f)]
        if len(any_steps) == 1:
            return Path(directory) / f"calibration-{any_steps[0]}.json"
        if any_steps:
            raise FileNotFoundError(f"budget {label} has calibrations for several step counts ({', '.join(any_steps)}) "
                                    f"beside the UEMs in {directory}; pass the steps to sample with (--steps)")
    there = f"the budgets there are {', '.join(found)}" if found else "there are none"
    raise FileNotFoundError(
        f"no calibration for budget {label} beside the UEMs in {directory} ({path.name} is missing; {there}); "
        f"pick one of those, or make it with `diffexit calibrate uem --uem {directory} --budget {given}"
        + (f" --steps {steps}`" if other_steps else "`"))
