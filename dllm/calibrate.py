"""``diffexit calibrate sched``: SchED thresholds with a conformal bound on the rate of answer-changing halts.

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

The parameters go to a JSON file (``{"sched": {...}, ...}``) that ``diffexit generate text``, the demo and
:func:`load_sched` accept. Only margin statistics are scanned (their thresholds are positive and scale).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..app.reporting import atomic_write_bytes
from ..samplers.schedules import ThresholdSchedule
from .generate import generate
from .halting import HaltDecision, HaltingRule, SchED, span_statistic
from .tasks import DECODE, TASK_NAMES, layout_of, sample
from .tokenizer import decode_answer, encode_prompts

SCAN_STATS = ("mean", "median", "quantile", "min", "mean_content")
SCALES = tuple(round(4.0 * 0.9 ** i, 6) for i in range(60))  # 4.0 down to about 0.008


class Recorder(HaltingRule):
    """A rule that never halts and keeps, per sample and step, the statistic, the progress, the masked
    positions and the argmax: what any threshold on that statistic would have done."""

    def __init__(self, stat: str, q: float, ignore_token_ids: Sequence[int]):
        self.stat, self.q, self.ignore = stat, q, tuple(ignore_token_ids)
        self.steps: list[list[tuple[float, float, torch.Tensor, torch.Tensor]]] = []

    def start(self, batch_size, span_length, device):
        self.steps = [[] for _ in range(batch_size)]

    def decide(self, stats, masked, progress, rows):
        value = span_statistic(stats, masked, self.stat, self.q, self.ignore)
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


def record(model, tok, task: str, examples, stat: str, q: float, batch: int = 50) -> list[Trajectory]:
    """Full-step greedy runs of ``examples`` with the statistic recorded at every step."""
    layout = layout_of(task)
    block, steps = DECODE[layout.span_length]
    ignore = (tok.eos_token_id, tok.pad_token_id)
    out = []
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        ids, attn = encode_prompts(tok, [e.prompt for e in chunk], layout.prompt_length)
        rec = Recorder(stat, q, ignore)
        gen = generate(model, ids, attention_mask=attn, gen_length=layout.span_length, steps=steps,
                       block_length=block, mask_id=tok.mask_token_id, halting=rec)
        for j, final in enumerate(gen.generated.cpu()):
            answers = [decode_answer(tok, torch.where(m, a, final)) for _, _, m, a in rec.steps[j]]
            out.append(Trajectory([s[0] for s in rec.steps[j]], [s[1] for s in rec.steps[j]], answers,
                                  decode_answer(tok, final)))
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
    """The SchED rule saved by ``diffexit calibrate sched``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read SchED parameters from {path}: {e}") from e
    if not isinstance(data, dict) or "sched" not in data:
        raise ValueError(f"{path} is not a SchED parameter file (no 'sched' entry); make one with "
                         f"`diffexit calibrate sched --risk R --out {path}`")
    return SchED.from_dict(data["sched"])


def main(argv: list[str], prog: str = "diffexit calibrate sched") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--risk", type=float, required=True, help="allowed rate of answer-changing halts, in (0, 1)")
    p.add_argument("--kind", default="cosine", choices=("linear", "cosine", "exp", "step"))
    p.add_argument("--stat", default="min", choices=SCAN_STATS)
    p.add_argument("--q", type=float, default=0.1, help="quantile for --stat quantile")
    p.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=TASK_NAMES, metavar="TASK")
    p.add_argument("--n-cal", type=int, default=100, help="calibration examples per task")
    p.add_argument("--n-val", type=int, default=100, help="validation examples per task")
    p.add_argument("--model", type=Path, default=None, help="an exported model folder (default: the embedded one)")
    p.add_argument("--out", type=Path, default=Path("sched.json"), help="parameter file to write")
    args = p.parse_args(argv)
    if not 0 < args.risk < 1:
        p.error(f"--risk must be in (0, 1), got {args.risk}")
    if args.n_cal <= 0 or args.n_val <= 0:
        p.error("--n-cal and --n-val must be positive")
    n_total = args.n_cal * len(args.tasks)
    if 1 / (n_total + 1) > args.risk:
        p.error(f"--risk {args.risk} is below 1/(n+1) = {1 / (n_total + 1):.4f} for n = {n_total} calibration "
                f"examples; use more (--n-cal) or a larger risk")

    from .text_model import load_embedded_text_model, load_text_model

    try:
        model, tok = load_text_model(args.model) if args.model else load_embedded_text_model()
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"{prog}: cannot load the model: {e}", file=sys.stderr)
        return 1
    cal, val = [], []
    for task in tqdm(args.tasks, desc="recording full-step runs"):
        # Seeds 1 and 2 of the held-out split: disjoint draws from the benchmark's seed 0.
        cal += record(model, tok, task, sample(task, "heldout", seed=1, n=args.n_cal), args.stat, args.q)
        val += record(model, tok, task, sample(task, "heldout", seed=2, n=args.n_val), args.stat, args.q)
    scale, scan = select_scale(cal, args.kind, args.risk)
    if scale is None:
        print(f"{prog}: no scale meets risk {args.risk} on {len(cal)} examples", file=sys.stderr)
        return 1
    rule = SchED(family(args.kind, scale), stat=args.stat, q=args.q,
                 ignore_token_ids=(tok.eos_token_id, tok.pad_token_id) if args.stat == "mean_content" else ())
    # The guarantee holds for the decoding it was calibrated under: keep that beside the parameters.
    result = {"sched": rule.to_dict(), "risk": args.risk, "scale": scale, "tasks": args.tasks,
              "decode": {str(span): {"block_length": b, "steps": st} for span, (b, st) in DECODE.items()},
              "model": str(args.model) if args.model else "embedded",
              "calibration": evaluate(cal, rule.schedule), "validation": evaluate(val, rule.schedule),
              "scan": scan}
    atomic_write_bytes(args.out, json.dumps(result, indent=2).encode())
    v = result["validation"]
    print(f"scale {scale}: {rule.schedule}, stat={args.stat}")
    print(f"calibration: changed {result['calibration']['rate']:.4f} (risk {args.risk}), "
          f"NFE speedup {result['calibration']['speedup_nfe']:.2f}x")
    print(f"validation:  changed {v['rate']:.4f} (95% CI {v['rate_ci95'][0]:.4f}-{v['rate_ci95'][1]:.4f}), "
          f"NFE speedup {v['speedup_nfe']:.2f}x on {v['n']} examples")
    print(f"wrote {args.out}")
    return 0
