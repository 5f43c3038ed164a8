"""Running ``diffexit bench images``' rows: the quality pass (same digits, same noise, blocks counted) and the timing
rounds against full depth.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from tqdm.auto import tqdm

from ...uem.block_adapters import blocks
from .image_methods import Bench, Method, MethodSkipped, Session

B16 = 16


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

    handles = [b.register_forward_hook(hook, with_kwargs=True) for b in blocks(transformer)]
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
