"""The cached remainder of an early exit: the blocks a sample skipped add the residual they added when they last ran.

Exiting after block ``k`` normally hands ``h_k`` to the output head, as if blocks ``k+1..L`` had added nothing. With
a cached remainder the head reads instead

    h_k + sum over j > k of r_j,      r_j = (output - input) of block j the last time it ran this sample

(``order=0``, the residual reuse of FORA/MagCache), or each ``r_j`` extrapolated to first order from its last two
runs, ``r_j(s) = r_j(a) + (s - a) (r_j(a) - r_j(b)) / (a - b)`` for runs at steps ``b < a`` (``order=1``, as
TaylorSeer extrapolates features; a block run only once is reused as is). Residuals are kept per batch row and per
block, so a sample that exited deep at one step refreshes more of its own remainder than one that exited shallow.

Whole steps run at full depth, refreshing every residual: the first ``refresh_first`` steps of a run (two give
first-order extrapolation its slope, as TaylorSeer's warm-up does; with none, a block adds nothing to a row it has
not yet run), every
``refresh_every``-th step, and the last ``refresh_last`` steps (the clean end of sampling, where errors stay in the
image). ``refresh_every=1`` is full depth at every step.

Between refreshes the exit rule runs at every step; with ``exit_every`` it runs only at one step in every
``exit_every`` (counted as TaylorSeer's ``cache_interval`` is, after the first ``refresh_first`` steps: the second
of them is the first to compute), and the steps between run no block at all: each sample's head reads the state
it read at the last step that computed (order 0), or that state extrapolated from the last two (order 1), and it
reports depth 0. That is TaylorSeer's step skipping (it extrapolates the last block's output), with exits saving
depth on the steps that compute. The state rather than the patch embedding plus every remainder: on the digits
DiT at 10 steps, computing steps 0, 2 and 7 only, the embedding plus the extrapolated residuals kept 24.2 dB
against full depth where diffusers' TaylorSeer kept 25.2.

Steps are told apart by the sampling progress that ``ExitAwareScheduler`` publishes (``i / (T - 1)`` at step ``i``
of ``T``), and the spacing of consecutive progress values gives how many steps remain. A pipeline may call the model
more than once per step: DiT, PixArt and SD3 make one call (guided halves ride in one batch), Flux's true CFG two
(the positive prompt, then the negative). Each call of a step has its own slot, its own residuals and states (the
``k``-th call at one progress is slot ``k``), so the negative pass never reads the positive pass's residuals. A slot
whose call's progress is not above its previous call's, or whose batch differs, starts a new run; a call at a lower
progress than the call before it starts a new run in every slot.
"""

from __future__ import annotations

from typing import Optional

import torch

ORDERS = {"cached": 0, "taylor": 1}
# What a step does (CachedRemainder.begin): every block runs; the exit rule decides; no block runs.
REFRESH, EXIT, SKIP = "refresh", "exit", "skip"
_STATE = "state"  # the key under which the state the head read is kept, beside the blocks' residuals
# More calls at one progress than this start over at slot 0: no pipeline makes more calls per step (Flux's true CFG
# makes two), and a loop of one-step runs (every call at progress 0) would otherwise add a slot per call.
MAX_CALLS_PER_STEP = 8


class _Slot:
    """One call's place in every step of a run: its batch size, last progress and spacing, step count, and kept
    residuals (block index, or ``_STATE``, -> ``[last, its step, previous, its step]``, per row)."""

    def __init__(self):
        self.rows: Optional[int] = None
        self.progress: Optional[float] = None
        self.spacing: Optional[float] = None
        self.step = -1
        self.kept: dict = {}


class CachedRemainder:
    """Per-row, per-block residuals of one sampling run, and when each step must refresh them.

    Args:
        order: ``0`` reuses the last residual, ``1`` extrapolates from the last two.
        refresh_every: every this many steps (counted from the run's first) runs at full depth; ``None``: only the
            first step and the last ``refresh_last``.
        refresh_last: the last this many steps run at full depth.
        refresh_first: the first this many steps run at full depth; with 0 the exit rule runs at the first step too,
            and until a block has run a row it adds nothing to it.
        exit_every: the exit rule runs at one step in every this many after the first ``refresh_first``, and no
            block runs at the others; ``None``: the rule runs at every step that is no refresh.
    """

    def __init__(self, order: int, refresh_every: Optional[int] = None, refresh_last: int = 0, refresh_first: int = 1,
                 exit_every: Optional[int] = None):
        if order not in (0, 1):
            raise ValueError(f"the remainder's order is 0 (reuse) or 1 (extrapolate), got {order!r}")
        if refresh_every is not None and (isinstance(refresh_every, bool) or not isinstance(refresh_every, int)
                                          or refresh_every < 1):
            raise ValueError(f"refresh_every must be an int >= 1 (1: full depth at every step), got {refresh_every!r}")
        if isinstance(refresh_last, bool) or not isinstance(refresh_last, int) or refresh_last < 0:
            raise ValueError(f"refresh_last must be an int >= 0, got {refresh_last!r}")
        if isinstance(refresh_first, bool) or not isinstance(refresh_first, int) or refresh_first < 0:
            raise ValueError(f"refresh_first must be an int >= 0, got {refresh_first!r}")
        if exit_every is not None and (isinstance(exit_every, bool) or not isinstance(exit_every, int)
                                       or exit_every < 1):
            raise ValueError(f"exit_every must be an int >= 1 (1: the exit rule runs at every step), got "
                             f"{exit_every!r}")
        self.order = order
        self.exit_every = exit_every
        self.refresh_every = refresh_every
        self.refresh_last = refresh_last
        self.refresh_first = refresh_first
        self._slots: list[_Slot] = []
        self._slot: Optional[_Slot] = None  # the current call's
        self._last_progress: Optional[float] = None  # the previous call's, of any slot
        self._calls_here = 0  # calls so far at that progress

    @property
    def step(self) -> int:
        """The current call's step in its run (0 at the first), -1 before any call."""
        return -1 if self._slot is None else self._slot.step

    def begin(self, progress: Optional[float], rows: int) -> str:
        """Start the step at ``progress`` for a batch of ``rows`` rows: :data:`REFRESH` (every block runs),
        :data:`EXIT` (the exit rule decides) or :data:`SKIP` (no block runs)."""
        if progress is None:
            raise ValueError("a cached remainder counts sampling steps by their progress, but none is set: swap in "
                             "the exit-aware scheduler (pipe.scheduler = ExitAwareScheduler(pipe.scheduler, "
                             "early_exit)), or set early_exit.progress before every call")
        if self._last_progress is not None and progress < self._last_progress:
            self._slots = []  # a new sampling run: every slot starts over
        same_step = progress == self._last_progress and self._calls_here < MAX_CALLS_PER_STEP
        index = self._calls_here if same_step else 0
        self._calls_here, self._last_progress = index + 1, progress
        if index == len(self._slots):
            self._slots.append(_Slot())
        slot = self._slot = self._slots[index]
        if rows != slot.rows or slot.progress is None or progress <= slot.progress:
            slot.rows, slot.spacing, slot.step, slot.kept = rows, None, 0, {}
        else:
            slot.spacing = progress - slot.progress
            slot.step += 1
        slot.progress = progress
        step = slot.step
        if step < self.refresh_first or (self.refresh_every is not None and step % self.refresh_every == 0):
            return REFRESH
        if step > 0 and round((1.0 - progress) / slot.spacing) < self.refresh_last:
            return REFRESH
        if self.exit_every is None or step == 0 or (step - self.refresh_first - 1) % self.exit_every == 0:
            return EXIT  # the first step computes: there is no state to reuse before it
        return SKIP

    def record(self, block: int, row_ids: torch.Tensor, residual: torch.Tensor) -> None:
        """Keep ``residual`` ``[len(row_ids), N, D]`` as block ``block``'s (0-based) latest for those batch rows."""
        self._keep(block, row_ids, residual)

    def record_state(self, row_ids: torch.Tensor, state: torch.Tensor) -> None:
        """Keep ``state`` ``[len(row_ids), N, D]``, what the head read for those rows at this step."""
        self._keep(_STATE, row_ids, state)

    def remainder(self, start: int, row_ids: torch.Tensor) -> torch.Tensor:
        """What blocks ``start..L-1`` (0-based) would add to those rows now: ``[len(row_ids), N, D]``, or a zero
        scalar when none of them has run yet."""
        total = torch.zeros(())
        for block in sorted(b for b in self._slot.kept if b != _STATE and b >= start):
            total = total + self._guess(block, row_ids)
        return total

    def state(self, row_ids: torch.Tensor) -> torch.Tensor:
        """The state the head read for those rows, reused or extrapolated to this step: ``[len(row_ids), N, D]``."""
        return self._guess(_STATE, row_ids)

    def _keep(self, key, row_ids, value):
        slot = self._slot
        entry = slot.kept.get(key)
        if entry is None:
            last = value.new_zeros((slot.rows, *value.shape[1:]))
            never = torch.full((slot.rows,), -1, dtype=torch.long, device=value.device)
            entry = slot.kept[key] = [last, never.clone(), None, never.clone()]
        last, last_step, prev, prev_step = entry
        if self.order == 1:
            if prev is None:
                prev = entry[2] = torch.zeros_like(last)
            prev[row_ids] = last[row_ids]
            prev_step[row_ids] = last_step[row_ids]
        last[row_ids] = value
        last_step[row_ids] = self.step

    def _guess(self, key, row_ids):
        last, last_step, prev, prev_step = self._slot.kept[key]
        # A block that never ran a row adds nothing to it (its kept value starts at zero, with no slope).
        rows_last = last[row_ids]
        if self.order == 0:
            return rows_last
        steps_last, steps_prev = last_step[row_ids], prev_step[row_ids]
        span = (steps_last - steps_prev).clamp(min=1).to(rows_last.dtype)
        # A row kept once has no slope yet: reuse its value as is.
        ahead = torch.where(steps_prev >= 0, self.step - steps_last, 0).to(rows_last.dtype)
        shape = (-1, *[1] * (rows_last.dim() - 1))
        return rows_last + (rows_last - prev[row_ids]) * (ahead / span).view(shape)
