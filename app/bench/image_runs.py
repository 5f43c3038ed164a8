"""Running ``diffexit bench images``' rows: the quality pass (same digits, same noise, blocks counted) and the
interleaved, repeated timing against full depth.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from tqdm.auto import tqdm

from ...uem.block_adapters import blocks
from .image_methods import Bench, Method, MethodSkipped, Session
from .timing import time_interleaved

B16 = 16


@contextlib.contextmanager
def count_block_rows(transformer) -> Iterator[list]:
    """Count image rows through the transformer's blocks: yields a one-item list, ``[rows x blocks run]``.

    A block counts as run when its first norm (``norm1``, which every DiT, PixArt and SD3 block applies first)
    runs: the caches replace a skipped block's forward (FirstBlockCache hands back its input, MagCache its input plus
    a residual, TaylorSeer an extrapolation), and none of them reaches its norm.
    """
    total = [0]

    def hook(module, args, output):
        total[0] += args[0].shape[0]

    handles = [b.norm1.register_forward_hook(hook) for b in blocks(transformer)]
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
    depth_counts: Optional[torch.Tensor]  # [steps, num_blocks + 1] samples running d = 0..L blocks, early exits only
    timesteps: Optional[torch.Tensor]  # [steps]


def run_quality(session: Session, labels: torch.Tensor, batch: int, seed: int, guidance_scale: float) -> Quality:
    """Generate one image per label, in batches of ``batch`` seeded ``seed, seed + 1, ...``."""
    images, counts, timesteps = [], None, None
    with count_block_rows(session.pipe.transformer) as rows:
        for i, chunk in enumerate(labels.split(batch)):
            images.append(session.generate(chunk, seed + i, guidance_scale))
            if session.exit_scheduler is not None:
                stats = session.exit_scheduler.statistics
                # Counted here, with a column for depth 0: a cached remainder's skipped steps run no block.
                depths = stats.depths
                here = torch.zeros(depths.shape[0], stats.num_blocks + 1, dtype=torch.long)
                here.scatter_add_(1, depths, torch.ones_like(depths))
                counts = here if counts is None else counts + here
                timesteps = stats.timesteps
    return Quality(torch.cat(images), rows[0], counts, timesteps)


def _generate_all(session: Session, labels: torch.Tensor, per_call: int, seed: int, guidance_scale: float) -> None:
    for i, chunk in enumerate(labels.split(per_call)):
        session.generate(chunk, seed + i, guidance_scale)


def time_sessions(sessions: dict[str, Session], *, b1_images: int, repeats: int, seed: int,
                  guidance_scale: float) -> dict[str, dict]:
    """Wall-clock of every session at batch 1 and batch 16, and its speedup over ``sessions["full"]``.

    Each batch size is timed by :func:`~diffexit.app.bench.timing.time_interleaved`: every session once per round,
    round-robin, ``repeats`` rounds; a speedup is full depth's median over the session's.

    Returns ``{name: {"speedup_wall_b1", "seconds_b1", "seconds_b1_spread", and the same for b16, "repeats"}}``.
    """
    setups = {"b1": (torch.arange(b1_images) % 10, 1), "b16": (torch.arange(B16) % 10, B16)}
    out = {name: {"repeats": repeats} for name in sessions}
    for key, (labels, per_call) in setups.items():
        timed = time_interleaved({name: functools.partial(_generate_all, session, labels, per_call, seed,
                                                          guidance_scale)
                                  for name, session in sessions.items()}, repeats)
        for name, t in timed.items():
            out[name].update({f"speedup_wall_{key}": timed["full"].median / t.median, f"seconds_{key}": t.median,
                              f"seconds_{key}_spread": t.spread})
    return out


def run_methods(bench: Bench, methods: list[Method], labels: torch.Tensor, *, batch: int, b1_images: int,
                repeats: int, seed: int) -> tuple[dict, dict]:
    """Build every method's session and run its quality pass, then time them all against ``"full"``.

    Returns ``(results, timing)``: ``results[name]`` is a :class:`Quality`, or the reason the method was skipped;
    ``timing`` is :func:`time_sessions`' answer for every method that ran.
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
    print(f"timing {len(sessions)} methods, interleaved ({repeats} repeats, {b1_images} image(s) at batch 1, "
          f"{B16} at batch {B16})", file=sys.stderr)
    with torch.no_grad():
        timing = time_sessions(sessions, b1_images=b1_images, repeats=repeats, seed=seed,
                               guidance_scale=bench.guidance_scale)
    return results, timing
