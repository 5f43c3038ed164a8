"""Where a DiffusionGemma stopping rule's passes go, against the oracle's, and where a decode's wall-clock goes.

For each task it decodes ``--n`` held-out examples every step (recording each step's argmax per canvas), reads the
oracle's stop per sample and canvas (the first step whose argmax is the canvas all steps end with, as
``bench gemma``'s oracle row), then decodes under each SchED row of ``bench gemma`` named in ``--rows`` and prints,
per canvas, the mean passes of the oracle and of the row (the gap is what the rule spends past the oracle), and the
row's agreement with all steps. With ``--timing`` it also splits each decode's wall-clock into encoder calls,
decoder calls and the rest (the loop's own work: sampling, noise, the rule, compaction)::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/gemma_where.py --tasks pick zip trio chain --n 64 --timing
"""

from __future__ import annotations

import argparse
import time

import torch

from diffexit.app.bench.gemma import SCHED_ROWS, _RowTracking, _sched
from diffexit.common.schedules import ThresholdSchedule
from diffexit.app.models import load_gemma_or_embedded
from diffexit.dllm.charlm.gemma import gemma_decode
from diffexit.dllm.charlm.tasks import layout_of, sample


class StepRecorder(_RowTracking):
    """Never stops; ``steps[k]`` lists canvas ``k``'s argmax ``[B, L]`` after each step (rows in the canvas's first
    call's order)."""

    def __init__(self):
        super().__init__()
        self.steps: list[list[torch.LongTensor]] = []

    def __call__(self, argmax_canvas, logits, **kwargs):
        if self.rows is None:
            self.steps.append([])
        self.steps[self.canvas].append(argmax_canvas[torch.argsort(self._rows_of(argmax_canvas))].clone())
        return torch.zeros(argmax_canvas.shape[0], dtype=torch.bool)


def oracle_passes(steps: list[torch.LongTensor]) -> torch.LongTensor:
    """``[B]``: the passes until the first step whose argmax equals the last one."""
    stacked = torch.stack(steps)  # [S, B, L]
    same = (stacked == stacked[-1]).all(-1)  # [S, B]
    return same.int().argmax(0) + 1


class Clock:
    """Wall-clock of the model's encoder calls and of its decoder calls (``model.forward``), in seconds."""

    def __init__(self, model):
        self.encoder = self.decoder = 0.0
        self._wrap(model.model.encoder, "encoder")
        self._wrap(model, "decoder")

    def _wrap(self, module, key):
        inner = module.forward

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            setattr(self, key, getattr(self, key) + time.perf_counter() - start)
            return out

        module.forward = timed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["pick", "zip", "trio", "chain"])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rows", nargs="+", default=["sched-constant-4-min", "sched-constant-3-quantile-stable"],
                   choices=[r[0] for r in SCHED_ROWS])
    p.add_argument("--try", dest="tries", nargs="*", default=[], metavar="KIND:START:END:STAT:PATIENCE",
                   help="other SchED settings to run beside --rows, e.g. constant:3.5:3.5:min:1")
    p.add_argument("--timing", action="store_true", help="split each decode's wall-clock (encoder, decoder, rest)")
    args = p.parse_args()
    model, tok = load_gemma_or_embedded(None)
    clock = Clock(model) if args.timing else None
    settings = {name: (s, stat, pat) for name, s, stat, pat in SCHED_ROWS if name in args.rows}
    for spec in args.tries:
        kind, start, end, stat, patience = spec.split(":")
        settings[spec] = (ThresholdSchedule(kind, float(start), float(end)), stat, int(patience))
    for task in args.tasks:
        layout = layout_of(task)
        prompts = [e.prompt for e in sample(task, "heldout", seed=0, n=args.n)]
        gemma_decode(model, tok, prompts[:1], layout, 1)  # warm-up
        chunks = [(i, prompts[i:i + args.batch]) for i in range(0, args.n, args.batch)]

        def run(make_rule):
            answers, rules, split = [], [], [0.0, 0.0, 0.0]
            for seed, chunk in chunks:
                rule = make_rule()
                if clock:
                    clock.encoder = clock.decoder = 0.0
                start = time.perf_counter()
                answers += gemma_decode(model, tok, chunk, layout, args.steps, seed=seed, stopping=rule)[0]
                if clock:
                    total = time.perf_counter() - start
                    split = [split[0] + clock.encoder, split[1] + clock.decoder,
                             split[2] + total - clock.encoder - clock.decoder]
                rules.append(rule)
            return answers, rules, split

        full, recorders, full_split = run(StepRecorder)
        oracle = [torch.cat([oracle_passes(r.steps[c]).float() for r in recorders if c < len(r.steps)])
                  for c in range(max(len(r.steps) for r in recorders))]
        print(f"\n## {task}: oracle {sum(float(o.sum()) for o in oracle) / args.n:.2f} passes a sample; per canvas "
              + " ".join(f"{float(o.mean()):.2f}" for o in oracle))
        if clock:
            print(f"all-steps seconds: encoder {full_split[0]:.3f}, decoder {full_split[1]:.3f}, "
                  f"rest {full_split[2]:.3f}")
        for name in settings:
            schedule, stat, patience = settings[name]
            answers, rules, split = run(lambda: _sched(schedule, stat, patience))
            same = sum(a == b for a, b in zip(answers, full)) / args.n
            per_canvas = [torch.cat([torch.where(r.canvas_stops[c] >= 0, r.canvas_stops[c] + 1, args.steps).float()
                                     for r in rules if c < len(r.canvas_stops)]) for c in range(len(oracle))]
            total = sum(float(p.sum()) for p in per_canvas) / args.n
            print(f"{name}: {total:.2f} passes a sample, same as all steps {same:.3f}; per canvas (row - oracle) "
                  + " ".join(f"{float(p.mean()):.2f}-{float(o.mean()):.2f}" for p, o in zip(per_canvas, oracle)))
            if clock:
                print(f"  seconds: encoder {split[0]:.3f}, decoder {split[1]:.3f}, rest {split[2]:.3f}")


if __name__ == "__main__":
    main()
