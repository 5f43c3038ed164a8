"""``diffexit bench gemma``: SchED against DiffusionGemma's own adaptive stopping, in the model's own ``generate``.

Every row decodes the same held-out examples of each task with a ``DiffusionGemmaForBlockDiffusion`` (``--model``,
default the embedded one that ``diffexit train text --arch diffusion-gemma`` makes), with the model's sampler and
temperature schedule at ``--steps`` denoising steps per canvas (default 16, one per canvas token), seeded the same for
every row, so a row differs from all steps only where its rule stopped a canvas early:

- ``all-steps``: every denoising step (no adaptive stopping): the reference;
- ``stock-C``: transformers' ``StableAndConfidentStoppingCriteria`` (the argmax stable for one step and mean token
  entropy below ``C``), at the pipeline's default 0.005 and over a sweep of ``confidence_threshold``;
- ``sched-...``: :class:`~diffexit.dllm.diffusion_gemma.SchEDStopping`, per schedule and statistic;
- ``oracle``: stops each canvas at the first step whose argmax is the canvas all steps end with (read from a
  recorded all-steps run of the same batch, untimed): the fewest passes any stopping rule in this loop can take and
  keep every answer, so the floor for the rows above.

Per task and row: ``passes`` (decoder forward passes per sample, as the model counts them), the wall-clock speedup
over all steps (timed in the same run), ``score``, and ``agreement``, the share of answers identical to all steps'.
Rows ``task="discriminating"`` and ``task="controls"`` average the tasks of each kind (see ``diffexit bench text``).

Each canvas's noise is seeded from the batch and the canvas index (``CanvasSeeds``): a batch whose samples all
stopped early skips the draws of the steps it did not run, and without that seed every later canvas of ``chain``
(nine canvases) would see other noise than at all steps, whether or not the rule changed anything.

Writes ``DIR/results.json`` (with ``goal``, per group and per task: the fewest passes of a stock and of a SchED row
that keep 99.5% of the answers the same as all steps, their ratio, and the oracle's passes over the stock row's) and
``DIR/pareto.png`` (passes saved against agreement), and prints the headline group's markdown table and the goal
lines.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm
from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaAdaptiveStopping

from ...common.cli_help import HelpFormatter
from ...common.results import markdown_table, write_results
from ...common.schedules import ThresholdSchedule
from ...dllm.charlm.gemma import gemma_decode
from ...dllm.charlm.tasks import CONTROLS, TASK_NAMES, layout_of, sample, score
from ...dllm.diffusion_gemma import SchEDStopping, sched_enabled

STOCK_CONFIDENCES = (0.005, 0.01, 0.05, 0.1, 0.2, 0.5)
# (name, schedule, statistic, patience). Margins here are of temperature-scaled logits (the sampler divides by 0.8
# falling to 0.4), so larger than raw ones. The mean is the paper's statistic; on a canvas that is mostly EOS padding
# it is sure of itself from the first step, so the min and a low quantile are the ones that wait for the answer.
# Patience 1 adds the stock rule's stability gate (the argmax unchanged since the step before).
SCHED_ROWS = (
    ("sched-cosine-7.5-2.5-mean", ThresholdSchedule("cosine", 7.5, 2.5), "mean", 0),
    ("sched-cosine-5-2-min", ThresholdSchedule("cosine", 5.0, 2.0), "min", 0),
    ("sched-cosine-6-3-min", ThresholdSchedule("cosine", 6.0, 3.0), "min", 0),
    ("sched-cosine-8-3-min", ThresholdSchedule("cosine", 8.0, 3.0), "min", 0),
    ("sched-cosine-4-1-min-stable", ThresholdSchedule("cosine", 4.0, 1.0), "min", 1),
    ("sched-cosine-6-2-quantile", ThresholdSchedule("cosine", 6.0, 2.0), "quantile", 0),
    ("sched-linear-entropy", ThresholdSchedule("linear", -0.005, -0.02), "mean_entropy", 0),
)


ORACLE = "oracle"


@dataclass(frozen=True)
class Row:
    name: str
    params: dict
    stock: Optional[float] = None  # confidence_threshold of the stock rule
    sched: Optional[tuple] = None  # (schedule, stat, patience) of SchEDStopping


def rows() -> list[Row]:
    out = [Row("all-steps", {"stopping": None})]
    out += [Row(f"stock-{c:g}", {"stability_threshold": 1, "confidence_threshold": c}, stock=c)
            for c in STOCK_CONFIDENCES]
    out += [Row(name, {"schedule": s.to_dict(), "stat": stat, "patience": patience}, sched=(s, stat, patience))
            for name, s, stat, patience in SCHED_ROWS]
    return out + [Row(ORACLE, {"stopping": "first step whose argmax is the all-steps canvas"})]


class CanvasRecorder(DiffusionGemmaAdaptiveStopping):
    """Never stops; ``canvases[k]`` is canvas ``k``'s argmax after its latest step, ``[B, canvas_length]``."""

    def __init__(self):
        self.canvases = []

    def reset(self):  # generate calls this before each canvas's denoising loop
        self.canvases.append(None)

    def __call__(self, argmax_canvas: torch.LongTensor, logits: torch.Tensor, **kwargs) -> torch.BoolTensor:
        self.canvases[-1] = argmax_canvas.clone()
        return torch.zeros(argmax_canvas.shape[0], dtype=torch.bool, device=argmax_canvas.device)


class FirstFinalStopping(DiffusionGemmaAdaptiveStopping):
    """Stops a sample at the first step whose argmax equals ``finals[k]``, the canvas every step ends with. A stopped
    canvas keeps that argmax, and the seeded noise is the same, so every canvas and answer is all steps'."""

    def __init__(self, finals: list[torch.LongTensor]):
        self.finals, self._canvas = finals, -1

    def reset(self):
        self._canvas += 1

    def __call__(self, argmax_canvas: torch.LongTensor, logits: torch.Tensor, **kwargs) -> torch.BoolTensor:
        return (argmax_canvas == self.finals[self._canvas]).all(-1)


@contextlib.contextmanager
def _stopping(model, rule: DiffusionGemmaAdaptiveStopping):
    """``generate`` consults ``rule`` for the ``with`` block (the hook ``enable_sched`` uses, for any rule)."""
    model._prepare_diffusion_stopping_criteria = lambda generation_config: rule
    try:
        yield
    finally:
        del model._prepare_diffusion_stopping_criteria


def _decode(model, tok, row: Row, prompts, layout, steps: int, seed: int):
    """``(answers, passes [B], seconds)``; seconds leave out the oracle's recording run."""
    if row.name == ORACLE:
        recorder = CanvasRecorder()
        with _stopping(model, recorder):
            gemma_decode(model, tok, prompts, layout, steps, seed=seed)
        with _stopping(model, FirstFinalStopping(recorder.canvases)):
            return _timed(gemma_decode, model, tok, prompts, layout, steps, seed=seed)
    if row.sched is not None:
        schedule, stat, patience = row.sched
        with sched_enabled(model, SchEDStopping(schedule, stat=stat, patience=patience)):
            return _timed(gemma_decode, model, tok, prompts, layout, steps, seed=seed)
    kwargs = {} if row.stock is None else {"stability_threshold": 1, "confidence_threshold": row.stock}
    return _timed(gemma_decode, model, tok, prompts, layout, steps, seed=seed, **kwargs)


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    answers, passes = fn(*args, **kwargs)
    return answers, passes, time.perf_counter() - start


def run_task(model, tok, task: str, table: list[Row], n: int, batch: int, steps: int, bar) -> list[dict]:
    layout = layout_of(task)
    examples = sample(task, "heldout", seed=0, n=n)
    _decode(model, tok, table[0], [examples[0].prompt], layout, 1, 0)  # untimed warm-up
    results, answers = [], {}
    for row in table:
        passes, seconds, answers[row.name] = [], 0.0, []
        for i in range(0, n, batch):
            chunk = examples[i:i + batch]
            texts, chunk_passes, chunk_seconds = _decode(model, tok, row, [e.prompt for e in chunk], layout, steps,
                                                         seed=i)
            seconds += chunk_seconds
            passes.append(chunk_passes.float())
            answers[row.name] += texts
        right = sum(score(task, e.prompt, t) for e, t in zip(examples, answers[row.name]))
        results.append({"task": task, "method": row.name, "params": row.params, "score": right / n,
                        "passes": float(torch.cat(passes).mean()), "seconds": seconds})
        bar.update(1)
    full = results[0]
    for r in results:
        r["full_score"] = full["score"]
        r["agreement"] = sum(a == b for a, b in zip(answers[r["method"]], answers["all-steps"])) / n
        r["speedup_passes"] = full["passes"] / r["passes"]
        r["speedup_wall"] = full["seconds"] / r["seconds"]
    return results


def summarise(per_task: list[dict], table: list[Row]) -> list[dict]:
    out = []
    for group in ("discriminating", "controls"):
        tasks = sorted({r["task"] for r in per_task if (r["task"] in CONTROLS) == (group == "controls")})
        if not tasks:
            continue
        for row in table:
            these = [r for r in per_task if r["method"] == row.name and r["task"] in tasks]
            full = [r for r in per_task if r["method"] == "all-steps" and r["task"] in tasks]
            mean = lambda key: sum(r[key] for r in these) / len(these)
            out.append({"task": group, "tasks": tasks, "method": row.name, "params": row.params,
                        "score": mean("score"), "full_score": mean("full_score"), "agreement": mean("agreement"),
                        "passes": mean("passes"), "speedup_passes": mean("speedup_passes"),
                        "speedup_wall": sum(r["seconds"] for r in full) / sum(r["seconds"] for r in these),
                        "seconds": sum(r["seconds"] for r in these)})
    return out


GOAL_AGREEMENT = 0.995


def goal(results: list[dict], group: str) -> dict:
    """The issue's yardstick on ``group``'s rows: the fewest decoder passes of a stock row and of a SchED row that
    keep at least ``GOAL_AGREEMENT`` of the answers the same as all steps, and SchED's passes over the stock's."""
    def best(prefix):
        rows = [r for r in results if r["task"] == group and r["method"].startswith(prefix)
                and r["agreement"] >= GOAL_AGREEMENT]
        row = min(rows, key=lambda r: r["passes"], default=None)
        return None if row is None else {"method": row["method"], "passes": row["passes"],
                                         "agreement": row["agreement"]}

    stock, sched = best("stock"), best("sched")
    ratio = sched["passes"] / stock["passes"] if stock and sched else None
    oracle = next(r["passes"] for r in results if r["task"] == group and r["method"] == ORACLE)
    return {"task": group, "agreement_at_least": GOAL_AGREEMENT, "stock": stock, "sched": sched,
            "sched_over_stock": ratio, "oracle_passes": oracle,
            "oracle_over_stock": oracle / stock["passes"] if stock else None}


def plot_pareto(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [t for t in ("discriminating", "controls", "chain") if any(r["task"] == t for r in results)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.4), squeeze=False)
    for ax, task in zip(axes[0], panels):
        for kind, color in (("all-steps", "black"), ("stock", "tab:orange"), ("sched", "tab:blue"),
                            (ORACLE, "tab:green")):
            pts = sorted((r["speedup_passes"], 100 * r["agreement"]) for r in results
                         if r["task"] == task and r["method"].startswith(kind))
            if pts:
                ax.plot(*zip(*pts), "o-" if kind in ("stock", "sched") else "*", color=color, label=kind, markersize=5)
        ax.set_title(task)
        ax.set_xlabel("fewer decoder passes (x)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("answers the same as all steps (%)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def describe_goal(g: dict) -> str:
    """One line: the fewest passes of each kind at the agreement the goal asks for, and their ratio."""
    def one(row):
        return "none" if row is None else f"{row['method']} ({row['passes']:.2f} passes, {row['agreement']:.3f} same)"

    def ratio(x):
        return "n/a" if x is None else f"{x:.2f}"

    return (f"{g['task']}, at >= {g['agreement_at_least']:.1%} the same as all steps: best stock {one(g['stock'])}, "
            f"best SchED {one(g['sched'])}; SchED / stock passes = {ratio(g['sched_over_stock'])} (goal: <= 0.70); "
            f"oracle {g['oracle_passes']:.2f} passes, {ratio(g['oracle_over_stock'])} of the stock row's")


COLUMNS = [("task", "task", ""), ("method", "method", ""), ("score", "acc", ".3f"),
           ("agreement", "same as all steps", ".3f"), ("passes", "passes", ".1f"),
           ("speedup_passes", "fewer passes", ".2f"), ("speedup_wall", "speedup wall", ".2f")]


def main(argv: list[str], prog: str = "diffexit bench gemma") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few examples per task: minutes")
    p.add_argument("--out", type=Path, default=Path("runs/bench-gemma"), help="output folder (default: %(default)s)")
    p.add_argument("--model", type=Path, default=None,
                   help="a DiffusionGemma folder (default: the embedded one, dllm/charlm/weights-gemma)")
    p.add_argument("--n", type=int, default=None, help="held-out examples per task (default 200, quick 8)")
    p.add_argument("--batch", type=int, default=50, help="examples decoded together (default: %(default)s)")
    p.add_argument("--steps", type=int, default=16, help="denoising steps per canvas (default: %(default)s)")
    p.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=TASK_NAMES, metavar="TASK",
                   help=f"tasks to run (default: all of {', '.join(TASK_NAMES)})")
    args = p.parse_args(argv)
    n = args.n if args.n is not None else (8 if args.quick else 200)
    if n <= 0 or args.batch <= 0 or args.steps <= 0:
        p.error("--n, --batch and --steps must be positive")

    from ..models import LoadError, load_gemma_or_embedded

    try:
        model, tok = load_gemma_or_embedded(args.model)
    except LoadError as e:  # its message already says what cannot be loaded and why
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    table = rows()
    results = []
    with tqdm(total=len(args.tasks) * len(table), desc="bench gemma", unit="run") as bar:
        for task in args.tasks:
            bar.set_postfix_str(task)
            results += run_task(model, tok, task, table, n, args.batch, args.steps, bar)
    results += summarise(results, table)
    groups = [g for g in ("discriminating", "controls") if any(r["task"] == g for r in results)]
    goals = [goal(results, g) for g in [*groups, *args.tasks]]
    args.out.mkdir(parents=True, exist_ok=True)
    path = write_results(args.out, "gemma", args.quick, results, n_per_task=n, steps=args.steps,
                         torch_threads=torch.get_num_threads(), goal=goals)
    plot_pareto(results, args.out / "pareto.png")
    print(markdown_table([r for r in results if r["task"] == groups[0]], COLUMNS))
    print("\n" + "\n".join(describe_goal(g) for g in goals))
    print(f"\nper-task rows, plot: {path}, {args.out / 'pareto.png'}")
    return 0
