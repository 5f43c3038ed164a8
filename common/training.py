"""What the three trainers (text model, digits DiT, DeeDiff heads) share: the learning-rate schedule, an EMA of the
weights, and checkpoints that an interruption can never leave half-written.

Checkpoints are ``accelerate``'s ``save_state`` folders. :func:`save_checkpoint` writes one into ``<final>.partial``
and swaps it in only once it is complete, by renames alone: the old one moves aside to ``<final>.previous`` and is
deleted only after the new one is in place. So a kill at any point leaves a complete checkpoint, either at
``<final>`` or, if it fell between the two renames, at ``<final>.previous``, where :func:`restore_checkpoint` puts
it back; a stale ``.partial`` from such a kill is simply written over. :func:`save_numbered_checkpoint` keeps a
rolling set ``ROOT/step-NNNNNN``, newest last.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

LR_FLOOR = 0.1  # the cosine ends at this fraction of the peak learning rate


def warmup_cosine(step: int, warmup: int, total: int, floor: float = LR_FLOOR) -> float:
    """Multiplier of the peak learning rate at 0-based ``step``: linear warm-up over ``warmup`` steps (``(step + 1) /
    warmup``), then a cosine from 1 down to ``floor`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    done = (step - warmup) / max(total - warmup, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


class EMA:
    """Exponential moving average of a module's parameters, kept in float32.

    Update ``n`` (0-based) uses decay ``min(max_decay, (1 + n) / (10 + n))``: the average follows the model closely
    early in training and settles to a window of about ``1 / (1 - max_decay)`` steps. It tracks
    ``module.named_parameters()``, so parameters held outside the module (a frozen backbone) are left out.
    ``state_dict`` / ``load_state_dict`` let ``accelerator.register_for_checkpointing`` save it.
    """

    def __init__(self, module: nn.Module, max_decay: float):
        if not 0.0 <= max_decay < 1.0:
            raise ValueError(f"the EMA decay must be in [0, 1), got {max_decay}")
        self.max_decay = max_decay
        self.updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        decay = min(self.max_decay, (1 + self.updates) / (10 + self.updates))
        for name, p in module.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - decay)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for name, p in module.named_parameters():
            p.copy_(self.shadow[name].to(p.device, p.dtype))

    @contextlib.contextmanager
    def applied(self, module: nn.Module) -> Iterator[nn.Module]:
        """``module`` with the averaged weights for the duration of the block (to export them); then its own again."""
        saved = {name: p.detach().clone() for name, p in module.named_parameters()}
        self.copy_to(module)
        try:
            yield module
        finally:
            with torch.no_grad():
                for name, p in module.named_parameters():
                    p.copy_(saved[name])

    def state_dict(self) -> dict:
        return {"max_decay": self.max_decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.max_decay, self.updates = state["max_decay"], state["updates"]
        self.shadow = {name: tensor.float().clone() for name, tensor in state["shadow"].items()}


def restore_checkpoint(final: Path) -> Path:
    """``final``, first moved back from ``<final>.previous`` when a kill fell between the two renames of
    :func:`save_checkpoint` (the one state in which ``final`` is missing but a complete checkpoint exists).

    Safe to call from every process at once: the renames that lose the race find the checkpoint in place.
    """
    final = Path(final)
    previous = final.with_name(final.name + ".previous")
    if not final.exists() and previous.is_dir():
        try:
            previous.rename(final)
        except OSError:
            if not final.is_dir():
                raise
    return final


def save_checkpoint(accelerator, final: Path, extra_files: Optional[dict[str, str]] = None) -> None:
    """``accelerator.save_state`` into ``final`` (replacing what is there), never leaving it without a complete one.

    ``extra_files`` (name -> text) are written into the checkpoint before it is swapped in. Every process calls
    this; the main one writes.
    """
    final = Path(final)
    partial = final.with_name(final.name + ".partial")
    previous = final.with_name(final.name + ".previous")
    if accelerator.is_main_process:
        restore_checkpoint(final)
        # What is left of these after a kill is stale: a cut-short save, or an old checkpoint half deleted.
        for stale in (partial, previous):
            if stale.exists():
                shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    # A model with tied weights (DiffusionGemma's decoder shares every weight with its encoder) makes accelerate drop
    # the aliases and warn with every name at each checkpoint; loading into the model ties them again, which the
    # resume tests check bit for bit.
    aliases = logging.getLogger("accelerate.utils.other")
    level = aliases.level
    aliases.setLevel(logging.ERROR)
    try:
        accelerator.save_state(str(partial))
    finally:
        aliases.setLevel(level)
    if accelerator.is_main_process:
        for name, text in (extra_files or {}).items():
            (partial / name).write_text(text)
        if final.exists():
            final.rename(previous)
        partial.rename(final)
        if previous.exists():
            shutil.rmtree(previous)
    accelerator.wait_for_everyone()


def numbered_checkpoints(root: Path) -> list[Path]:
    """The complete ``ROOT/step-NNNNNN`` checkpoints, oldest first (``.partial`` ones are not complete)."""
    root = Path(root)
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def checkpoint_step(path: Path) -> int:
    """The step a numbered checkpoint was saved at."""
    return int(Path(path).name[5:])


def save_numbered_checkpoint(accelerator, root: Path, step: int, keep: int = 2) -> Path:
    """Save ``ROOT/step-NNNNNN`` atomically and keep only the newest ``keep``; returns its path."""
    final = Path(root) / f"step-{step:06d}"
    if not final.exists():
        save_checkpoint(accelerator, final)
    if accelerator.is_main_process:
        for old in numbered_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
