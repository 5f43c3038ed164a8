"""SchED thresholds with a conformal bound on the rate of answer-changing halts (``diffexit calibrate sched``).

The risk is the rate of samples whose halted answer differs from the full-step answer. It is controlled with
conformal risk control (the split-conformal recipe that LYNX applies to early exits):

1. Decode a calibration split once at full steps while recording, at every step, the span statistic and the
   answer a halt there would give. Before it halts, SchED changes nothing about decoding, so a halt at step
   ``t`` gives the committed tokens plus that step's argmax on the still-masked positions: one full run
   tells what every threshold would have produced.
2. Scan a family of schedules from conservative to aggressive: the chosen kind with ``(high, low)`` scaled by
   ``c`` (``c`` falling). Each sample's loss ``L_i(c)`` (1 if the answer changed) is made monotone in the scan
   by a running maximum, which can only over-count.
3. Keep the most aggressive ``c`` with ``(n * mean_i L_i(c) + 1) / (n + 1) <= R``. Then the expected rate on a
   new exchangeable sample is at most ``R`` (Angelopoulos et al., "Conformal Risk Control").
4. Measure the chosen rule on a separate validation split, with a 95% Wilson interval.

The parameters go to a JSON file (``{"sched": {...}, ...}``, :func:`save_sched`) that ``diffexit generate text``, the
demo and :func:`load_sched` accept. Only the statistics marked ``scanned`` in :data:`~diffexit.dllm.statistics.STATISTICS`
are scanned: margins, whose thresholds are positive and scale.
The command itself, which records the embedded tasks, is ``diffexit.app.calibrate_sched``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..common.results import atomic_write_bytes
from ..common.schedules import ThresholdSchedule
from .generate import generate
from .halting import HaltDecision, HaltingRule, SchED, span_statistic
from .statistics import check_scanned, scanned_names

SCAN_STATS = scanned_names()
SCALES = tuple(round(4.0 * 0.9 ** i, 6) for i in range(60))  # 4.0 down to about 0.008


class Recorder(HaltingRule):
    """A rule that never halts and keeps, per sample and step, the statistic, the progress, the masked
    positions and the argmax: what any threshold on that statistic would have done."""

    def __init__(self, stat: str, q: float, ignore_token_ids: Sequence[int]):
        check_scanned(stat)
        self.stat, self.q, self.ignore = stat, q, tuple(ignore_token_ids)
        self.steps: list[list[tuple[float, float, torch.Tensor, torch.Tensor]]] = []

    def start(self, batch_size, span_length, device, total_steps):
        super().start(batch_size, span_length, device, total_steps)
        self.steps = [[] for _ in range(batch_size)]

    def decide(self, stats, masked, step, rows):
        value = span_statistic(stats, masked, self.stat, self.q, self.ignore)
        progress = self.progress(step)
        for j, r in enumerate(rows.tolist()):
            self.steps[r].append((float(value[j]), float(progress[j]), masked[j].cpu(), stats.top1_id[j].cpu()))
        none = torch.zeros(len(rows), dtype=torch.bool, device=masked.device)
        return HaltDecision(halt=none, value=value, threshold=torch.full_like(value, float("inf")))


@dataclass
class Trajectory:
    """One sample's full-step run: per step ``(value, progress, answer if halted here)`` and the full answer."""

    values: list[float]
    progress: list[float]
    halted_answers: list[str]
    full_answer: str

    def outcome(self, schedule: ThresholdSchedule) -> tuple[str, int]:
        """The answer and NFE that SchED with ``schedule`` would give."""
        for t, (v, p) in enumerate(zip(self.values, self.progress)):
            if v >= schedule(p):
                return self.halted_answers[t], t + 1
        return self.full_answer, len(self.values)


def record(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], *, gen_length: int, steps: int,
           block_length: int, mask_id: int, decode: Callable[[torch.Tensor], str], stat: str, q: float = 0.1,
           ignore_token_ids: Sequence[int] = ()) -> list[Trajectory]:
    """Full-step greedy runs of the prompts ``input_ids`` ``[B, P]`` with the statistic recorded at every step.

    ``decode`` turns a span ``[gen_length]`` of token ids into the answer text that halting must not change.
    """
    from .exact_cache import block_causal_layout

    if block_causal_layout(model) is not None:
        # The recorded trajectories are whole-span halting's; such a model halts per block (block_decoding).
        raise ValueError("calibration records whole-span halting, and a block-causal model halts per block: "
                         "calibrate the bidirectional model (--model charlm), or pick a schedule with bench text")
    rec = Recorder(stat, q, ignore_token_ids)
    gen = generate(model, input_ids, attention_mask=attention_mask, gen_length=gen_length, steps=steps,
                   block_length=block_length, mask_id=mask_id, halting=rec)
    out = []
    for j, final in enumerate(gen.generated.cpu()):
        answers = [decode(torch.where(m, a, final)) for _, _, m, a in rec.steps[j]]
        out.append(Trajectory([s[0] for s in rec.steps[j]], [s[1] for s in rec.steps[j]], answers, decode(final)))
    return out


def family(kind: str, scale: float) -> ThresholdSchedule:
    """The scanned schedules: the paper's ``(7.5, 2.5)`` scaled by ``scale`` (``k = 4`` for ``exp``)."""
    return ThresholdSchedule(kind, 7.5 * scale, 2.5 * scale, k=4.0 if kind == "exp" else None)


def select_scale(trajectories: list[Trajectory], kind: str, risk: float,
                 scales: Sequence[float] = SCALES) -> tuple[Optional[float], list[dict]]:
    """The most aggressive scale whose conformal risk bound is at most ``risk``, and the whole scan.

    Returns ``(None, scan)`` when even the most conservative scale fails the bound (too few samples for
    that ``risk``: the bound is at least ``1 / (n + 1)``).
    """
    n = len(trajectories)
    worst = [0] * n  # running max of each sample's loss along the scan
    chosen, scan = None, []
    for c in scales:
        schedule = family(kind, c)
        nfe = 0
        for i, tr in enumerate(trajectories):
            answer, used = tr.outcome(schedule)
            worst[i] = max(worst[i], int(answer != tr.full_answer))
            nfe += used
        empirical = sum(worst) / n
        bound = (n * empirical + 1) / (n + 1)
        full_nfe = sum(len(t.values) for t in trajectories)
        scan.append({"scale": c, "empirical_risk": empirical, "bound": bound, "speedup_nfe": full_nfe / nfe})
        if bound > risk:
            break
        chosen = c
    return chosen, scan


def evaluate(trajectories: list[Trajectory], schedule: ThresholdSchedule) -> dict:
    """Rate of changed answers (with a 95% Wilson interval) and NFE speedup of ``schedule`` on ``trajectories``."""
    n = len(trajectories)
    changed = nfe = 0
    for tr in trajectories:
        answer, used = tr.outcome(schedule)
        changed += answer != tr.full_answer
        nfe += used
    return {"n": n, "changed": changed, "rate": changed / n, "rate_ci95": wilson(changed, n),
            "speedup_nfe": sum(len(t.values) for t in trajectories) / nfe}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for a binomial rate ``k / n``."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def load_sched(path: Path | str) -> SchED:
    """The SchED rule saved by ``diffexit calibrate sched`` (:func:`save_sched`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read SchED parameters from {path}: {e}") from e
    if not isinstance(data, dict) or "sched" not in data:
        raise ValueError(f"{path} is not a SchED parameter file (no 'sched' entry); make one with "
                         f"`diffexit calibrate sched --risk R --out {path}`")
    return SchED.from_dict(data["sched"])


def save_sched(path: Path | str, rule: SchED, **record) -> Path:
    """Write ``rule`` and what it was calibrated for (``record``: risk, figures, decoding...) as the JSON file that
    :func:`load_sched`, ``diffexit generate text --config`` and the demo read."""
    atomic_write_bytes(Path(path), json.dumps({"sched": rule.to_dict(), **record}, indent=2).encode())
    return Path(path)


def check_risk(risk, n: int) -> None:
    """``ValueError`` naming the fix for a risk outside ``(0, 1)``, or for ``n`` calibration prompts too few to
    certify it (the conformal bound is at least ``1 / (n + 1)``)."""
    if isinstance(risk, bool) or not isinstance(risk, (int, float)) or not 0 < risk < 1:
        raise ValueError(f"the risk is a rate of changed answers in (0, 1), got {risk!r}")
    if 1 / (n + 1) > risk:
        need = math.ceil(1 / risk - 1)
        raise ValueError(f"risk {risk} needs at least {need} calibration prompts (the conformal bound is at least "
                         f"1/(n+1)), and there are {n}: give more prompts or allow a larger risk")


def conformal_select(scan, risk: float):
    """Conformal risk control over a scan from conservative to aggressive.

    ``scan`` yields ``(parameter, losses)`` (``losses``: one 0/1 per calibration prompt, 1 = answer changed), and is
    read lazily, so a scan that decodes stops at the first parameter over the bound. Each prompt's loss is made
    monotone along the scan by a running maximum. Returns ``(the last parameter whose bound (n * mean + 1) / (n + 1)
    is at most risk, or None; [{"parameter", "empirical_risk", "bound"}, ...])``.
    """
    worst, chosen, rows = None, None, []
    for parameter, losses in scan:
        worst = list(losses) if worst is None else [max(a, int(b)) for a, b in zip(worst, losses)]
        n = len(worst)
        check_risk(risk, n)
        empirical = sum(worst) / n
        bound = (n * empirical + 1) / (n + 1)
        rows.append({"parameter": parameter, "empirical_risk": empirical, "bound": bound})
        if bound > risk:
            break
        chosen = parameter
    return chosen, rows
