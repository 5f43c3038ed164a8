"""``diffexit bench gemma``: SchED against DiffusionGemma's own adaptive stopping, in a loop where a stopped sample
leaves the batch.

Every row decodes the same held-out examples of each task with a ``DiffusionGemmaForBlockDiffusion`` (``--model``,
default the embedded one that ``diffexit train text --arch diffusion-gemma`` makes), with the model's own encoder and
decoder calls, sampler and temperature schedule at ``--steps`` denoising steps per canvas (default 16, one per canvas
token), through :func:`diffexit.dllm.gemma_loop.decode`: a sample that stopped leaves the batch, so a row's
wall-clock follows its passes instead of its slowest sample's (transformers' ``generate`` keeps stopped samples in
the batch). Each example draws its noise from its own generator (seeded by its index, each canvas from that and the
canvas index), so it decodes as it would alone, and a row differs from all steps only where its rule stopped a
canvas early. The rows (``family`` in parentheses):

- ``all-steps`` (all-steps): every denoising step (no adaptive stopping): the reference;
- ``stock-C`` (stock): transformers' ``StableAndConfidentStoppingCriteria`` (the argmax stable for one step and mean
  token entropy below ``C``), at the pipeline's default 0.005 and over a sweep of ``confidence_threshold``;
- ``sched-...`` (sched): :class:`~diffexit.dllm.diffusion_gemma.SchEDStopping`, per schedule and statistic;
- ``learned-halt`` (learned), where the model's folder ships a learned rule (``commit_rule.safetensors``, made by
  ``diffexit train commit --model gemma``) calibrated at ``--steps``: :class:`~diffexit.dllm.gemma_commit.
  LearnedStopping` at its calibrated threshold (it stops a canvas once every token's argmax is predicted final);
- ``oracle`` (oracle): stops each canvas at the first step whose argmax is the canvas all steps end with (read from a
  recorded all-steps run of the same batch, untimed): the fewest passes any stopping rule in this loop can take and
  keep every answer, so the floor for the rows above.

Per task and row: ``nfe`` (decoder forward passes per sample), ``speedup_nfe`` and ``speedup_wall`` over all steps,
``passes_over_oracle``, ``score``, and ``agreement``, the share of answers identical to all steps'. Wall-clock: the
rows of a task are timed interleaved, ``REPEATS`` times (median ``seconds``, ``seconds_spread`` the slowest minus
the fastest repeat), and a row whose wall speedup is outside 0.5-1.5x its NFE speedup is ``noisy``
(:mod:`diffexit.app.bench.timing`). Rows ``task="discriminating"`` and ``task="controls"`` average the tasks of each
kind (see ``diffexit bench text``).

Writes ``DIR/results.json`` (with ``goal``, per group and per task: the fewest passes of a stock and of a SchED-family or
learned row (under ``sched``) that keep 99.5% of the answers the same as all steps, their ratio, each over the
oracle's, and issue #31's goal (3): that row within 1.15x the oracle's passes, at a wall speedup 0.9-1.5x its NFE
speedup), ``DIR/pareto.png``
(passes saved against agreement) and a line in ``DIR/history.jsonl``, and prints the headline group's markdown table
and the goal lines.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaAdaptiveStopping,
    StableAndConfidentStoppingCriteria,
)

from ...common.cli_help import HelpFormatter
from ...common.results import markdown_table, write_results
from ...common.schedules import ThresholdSchedule
from ...dllm.charlm.gemma import gemma_decode
from ...dllm.charlm.tasks import CONTROLS, TASK_NAMES, layout_of, sample, score
from ...dllm.commit_rule import FILENAME, CommitModel
from ...dllm.diffusion_gemma import SchEDStopping
from ...dllm.gemma_commit import GEMMA_FEATURES, LearnedStopping, check_gemma
from .history import append_history, history_line
from .rows import RowId, bench_row
from .timing import REPEATS, is_noisy, time_interleaved

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
    # The fewest passes that kept every answer among 1,098 (statistic, schedule, patience) settings replayed on the
    # recorded all-steps steps of 128 examples of each one-canvas discriminating task (pick, zip, trio), drawn with
    # another seed than the bench's (heldout seed 1): 1.44x, 1.45x and 1.48x the oracle's passes there.
    ("sched-constant-3-quantile-stable", ThresholdSchedule("constant", 3.0, 3.0), "quantile", 1),
    ("sched-linear-entropy-0.05-0.1-stable", ThresholdSchedule("linear", -0.05, -0.1), "mean_entropy", 1),
    ("sched-constant-4-min", ThresholdSchedule("constant", 4.0, 4.0), "min", 0),
)


ORACLE = "oracle"


@dataclass(frozen=True)
class Row:
    """A bench row: its identity, and a call that makes a fresh stopping rule (None: every step) or, for the
    oracle, that makes it from the recorded all-steps canvases."""

    identity: RowId
    rule: Callable[..., Optional[DiffusionGemmaAdaptiveStopping]]

    @property
    def name(self) -> str:
        return self.identity.name


def _stock(confidence: float) -> StableAndConfidentStoppingCriteria:
    return StableAndConfidentStoppingCriteria(1, confidence)


def _sched(schedule: ThresholdSchedule, stat: str, patience: int) -> SchEDStopping:
    return SchEDStopping(schedule, stat=stat, patience=patience)


def rows(commit_model: Optional[CommitModel] = None) -> list[Row]:
    """The table; ``commit_model`` (checked against the model, calibrated at the bench's steps) adds
    ``learned-halt``."""
    out = [Row(RowId("all-steps", "all-steps", {"stopping": None}), lambda: None)]
    out += [Row(RowId(f"stock-{c:g}", "stock", {"stability_threshold": 1, "confidence_threshold": c}),
                functools.partial(_stock, c)) for c in STOCK_CONFIDENCES]
    out += [Row(RowId(name, "sched", {"schedule": s.to_dict(), "stat": stat, "patience": patience}),
                functools.partial(_sched, s, stat, patience)) for name, s, stat, patience in SCHED_ROWS]
    if commit_model is not None:
        (threshold,) = commit_model.thresholds["halt"].values()
        out.append(Row(RowId("learned-halt", "learned", {"rule": FILENAME, "lm_digest": commit_model.lm_digest,
                                                         "threshold": threshold}),
                       functools.partial(LearnedStopping, commit_model)))
    return out + [Row(RowId(ORACLE, "oracle", {"stopping": "first step whose argmax is the all-steps canvas"}),
                      FirstFinalStopping)]


class _RowTracking(DiffusionGemmaAdaptiveStopping):
    """A rule that knows, within a canvas, which row of the canvas's first call each of its current rows is (the
    loop drops stopped samples from the batch and tells the rule through ``select_rows``)."""

    def __init__(self):
        self.canvas, self.rows = -1, None

    def reset(self):  # the loop calls this before each canvas's denoising loop
        self.canvas, self.rows = self.canvas + 1, None

    def select_rows(self, index: torch.LongTensor) -> None:
        self.rows = self.rows[index]

    def _rows_of(self, argmax_canvas: torch.LongTensor) -> torch.LongTensor:
        if self.rows is None:
            self.rows = torch.arange(argmax_canvas.shape[0], device=argmax_canvas.device)
        return self.rows


class CanvasRecorder(_RowTracking):
    """Never stops; ``canvases[k]`` is canvas ``k``'s argmax after its latest step, ``[B, canvas_length]``."""

    def __init__(self):
        super().__init__()
        self.canvases: list[torch.LongTensor] = []

    def __call__(self, argmax_canvas: torch.LongTensor, logits: torch.Tensor, **kwargs) -> torch.BoolTensor:
        if self.rows is None:
            self.canvases.append(argmax_canvas.clone())
        self.canvases[self.canvas][self._rows_of(argmax_canvas)] = argmax_canvas
        return torch.zeros(argmax_canvas.shape[0], dtype=torch.bool, device=argmax_canvas.device)


class FirstFinalStopping(_RowTracking):
    """Stops a sample at the first step whose argmax equals ``finals[k]``, the canvas every step ends with. A stopped
    canvas keeps that argmax, and the seeded noise is the same, so every canvas and answer is all steps'."""

    def __init__(self, finals: list[torch.LongTensor]):
        super().__init__()
        self.finals = finals

    def __call__(self, argmax_canvas: torch.LongTensor, logits: torch.Tensor, **kwargs) -> torch.BoolTensor:
        return (argmax_canvas == self.finals[self.canvas][self._rows_of(argmax_canvas)]).all(-1)


def _decodes(model, tok, row: Row, chunks, layout, steps: int, finals, bar):
    """A call that decodes every chunk ``(seed, prompts)`` under ``row``'s rule: ``(answers, passes [n])``."""
    def run():
        answers, passes = [], []
        for (seed, prompts), chunk_finals in zip(chunks, finals):
            rule = row.rule(chunk_finals) if row.name == ORACLE else row.rule()
            texts, chunk_passes = gemma_decode(model, tok, prompts, layout, steps, seed=seed, stopping=rule)
            answers += texts
            passes.append(chunk_passes)
        bar.update(1)
        return answers, torch.cat(passes).float()

    return run


def run_task(model, tok, task: str, table: list[Row], n: int, batch: int, steps: int, bar,
             model_name: str) -> list[dict]:
    layout = layout_of(task)
    examples = sample(task, "heldout", seed=0, n=n)
    gemma_decode(model, tok, [examples[0].prompt], layout, 1)  # untimed warm-up
    chunks = [(i, [e.prompt for e in examples[i:i + batch]]) for i in range(0, n, batch)]
    finals = []
    for seed, prompts in chunks:  # the oracle's all-steps recording, untimed
        recorder = CanvasRecorder()
        gemma_decode(model, tok, prompts, layout, steps, seed=seed, stopping=recorder)
        finals.append(recorder.canvases)
    timed = time_interleaved({row.name: _decodes(model, tok, row, chunks, layout, steps, finals, bar)
                              for row in table})
    full_answers, full_passes = timed["all-steps"].result
    full_nfe, full_seconds = float(full_passes.mean()), timed["all-steps"].median
    oracle_nfe = float(timed[ORACLE].result[1].mean())
    full_score = sum(score(task, e.prompt, a) for e, a in zip(examples, full_answers)) / n
    results = []
    for row in table:
        answers, passes = timed[row.name].result
        nfe = float(passes.mean())
        speedup_nfe, speedup_wall = full_nfe / nfe, full_seconds / timed[row.name].median
        results.append(bench_row(
            row.identity, task=task, model=model_name,
            score=sum(score(task, e.prompt, a) for e, a in zip(examples, answers)) / n, full_score=full_score,
            agreement=sum(a == b for a, b in zip(answers, full_answers)) / n, nfe=nfe, speedup_nfe=speedup_nfe,
            speedup_wall=speedup_wall, passes_over_oracle=nfe / oracle_nfe, **timed[row.name].figures(),
            noisy=is_noisy(speedup_wall, speedup_nfe)))
    return results


def summarise(per_task: list[dict], table: list[Row]) -> list[dict]:
    out = []
    for group in ("discriminating", "controls"):
        tasks = sorted({r["task"] for r in per_task if (r["task"] in CONTROLS) == (group == "controls")})
        if not tasks:
            continue
        oracle = [r for r in per_task if r["method"] == ORACLE and r["task"] in tasks]
        for row in table:
            these = [r for r in per_task if r["method"] == row.name and r["task"] in tasks]
            mean = lambda key: sum(r[key] for r in these) / len(these)
            # Averaged over the tasks as speedup_nfe is, so that their ratio compares like with like (a ratio of
            # summed seconds weighs chain's nine canvases against the mean of four tasks' pass speedups).
            speedup_wall = mean("speedup_wall")
            out.append(bench_row(
                row.identity, task=group, tasks=tasks, model=these[0]["model"], score=mean("score"),
                full_score=mean("full_score"), agreement=mean("agreement"), nfe=mean("nfe"),
                speedup_nfe=mean("speedup_nfe"), speedup_wall=speedup_wall,
                passes_over_oracle=mean("nfe") / (sum(r["nfe"] for r in oracle) / len(oracle)),
                seconds=sum(r["seconds"] for r in these), seconds_spread=sum(r["seconds_spread"] for r in these),
                repeats=these[0]["repeats"], noisy=is_noisy(speedup_wall, mean("speedup_nfe"))))
    return out


def shipped_rule(model, steps: int) -> Optional[CommitModel]:
    """The learned rule shipped beside the model's weights, checked against the model (``ValueError`` with the fix
    for one made for another), or None where there is none or it was calibrated at other steps than ``steps`` (its
    row is left out, and said so)."""
    path = Path(getattr(model.config, "_name_or_path", "") or ".") / FILENAME
    if not path.is_file():
        return None
    commit_model = CommitModel.load(path)
    if commit_model.features != GEMMA_FEATURES:
        raise ValueError(f"{path} is a commit rule for the masked loops, not DiffusionGemma's; remove it, or replace "
                         f"it with `diffexit train commit --model FOLDER`")
    check_gemma(commit_model, model, str(path))
    calibrated = commit_model.record.get("denoising_steps")
    if calibrated != steps:
        print(f"learned-halt left out: {path} was calibrated at {calibrated} denoising steps, the bench runs {steps}",
              file=sys.stderr)
        return None
    return commit_model


GOAL_AGREEMENT = 0.995
GOAL_OVER_ORACLE = 1.15  # issue #31 (3): the best SchED row within 1.15x the oracle's passes...
GOAL_WALL_OVER_NFE = (0.9, 1.5)  # ...at a wall speedup 0.9-1.5x its NFE speedup


def goal(results: list[dict], group: str) -> dict:
    """The yardsticks on ``group``'s rows: the fewest decoder passes of a stock row and of a SchED-family or learned
    row (``sched``) that keep at least ``GOAL_AGREEMENT`` of the answers the same as all steps, its passes over the
    stock's, and issue #31's goal (3), met or not: that row within ``GOAL_OVER_ORACLE`` of the oracle's passes, its wall speedup within
    ``GOAL_WALL_OVER_NFE`` times its NFE speedup."""
    def best(family):
        rows = [r for r in results if r["task"] == group and r["family"] == family
                and r["agreement"] >= GOAL_AGREEMENT]
        row = min(rows, key=lambda r: r["nfe"], default=None)
        return None if row is None else {k: row[k] for k in ("method", "nfe", "agreement", "passes_over_oracle",
                                                             "speedup_nfe", "speedup_wall")}

    stock = best("stock")
    candidates = [b for b in (best("sched"), best("learned")) if b is not None]
    sched = min(candidates, key=lambda r: r["nfe"], default=None)
    oracle = next(r["nfe"] for r in results if r["task"] == group and r["method"] == ORACLE)
    wall_over_nfe = sched["speedup_wall"] / sched["speedup_nfe"] if sched else None
    low, high = GOAL_WALL_OVER_NFE
    return {"task": group, "agreement_at_least": GOAL_AGREEMENT, "stock": stock, "sched": sched,
            "sched_over_stock": sched["nfe"] / stock["nfe"] if stock and sched else None, "oracle_nfe": oracle,
            "oracle_over_stock": oracle / stock["nfe"] if stock else None,
            "sched_wall_over_nfe": wall_over_nfe,
            "met": sched is not None and sched["passes_over_oracle"] <= GOAL_OVER_ORACLE
            and low <= wall_over_nfe <= high}


def plot_pareto(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [t for t in ("discriminating", "controls", "chain") if any(r["task"] == t for r in results)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.4), squeeze=False)
    for ax, task in zip(axes[0], panels):
        for family, color in (("all-steps", "black"), ("stock", "tab:orange"), ("sched", "tab:blue"),
                              ("learned", "tab:red"), ("oracle", "tab:green")):
            pts = sorted((r["speedup_nfe"], 100 * r["agreement"]) for r in results
                         if r["task"] == task and r["family"] == family)
            if pts:
                ax.plot(*zip(*pts), "o-" if family in ("stock", "sched") else "*", color=color, label=family,
                        markersize=5)
        ax.set_title(task)
        ax.set_xlabel("fewer decoder passes (x)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("answers the same as all steps (%)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def describe_goal(g: dict) -> str:
    """One line: the fewest passes of each kind at the agreement the goal asks for, their ratios, and goal (3)."""
    def one(row):
        return "none" if row is None else (f"{row['method']} ({row['nfe']:.2f} passes, {row['agreement']:.3f} same, "
                                           f"{row['passes_over_oracle']:.2f}x the oracle's)")

    def ratio(x):
        return "n/a" if x is None else f"{x:.2f}"

    low, high = GOAL_WALL_OVER_NFE
    return (f"{g['task']}, at >= {g['agreement_at_least']:.1%} the same as all steps: best stock {one(g['stock'])}, "
            f"best SchED or learned {one(g['sched'])}; SchED / stock passes = {ratio(g['sched_over_stock'])}; oracle "
            f"{g['oracle_nfe']:.2f} passes; goal (SchED or learned <= {GOAL_OVER_ORACLE}x the oracle's passes, wall speedup "
            f"{low}-{high}x its pass speedup: {ratio(g['sched_wall_over_nfe'])}): "
            f"{'met' if g['met'] else 'not met'}")


COLUMNS = [("task", "task", ""), ("method", "method", ""), ("score", "acc", ".3f"),
           ("agreement", "same as all steps", ".3f"), ("nfe", "passes", ".1f"),
           ("passes_over_oracle", "x oracle", ".2f"), ("speedup_nfe", "fewer passes", ".2f"),
           ("speedup_wall", "speedup wall", ".2f"), ("seconds_spread", "spread s", ".2f"), ("noisy", "noisy", "")]


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
    model_name = "embedded" if args.model is None else str(args.model)
    try:
        commit_model = shipped_rule(model, args.steps)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    table = rows(commit_model)
    results = []
    with tqdm(total=len(args.tasks) * len(table) * REPEATS, desc="bench gemma", unit="run") as bar:
        for task in args.tasks:
            bar.set_postfix_str(task)
            results += run_task(model, tok, task, table, n, args.batch, args.steps, bar, model_name)
    results += summarise(results, table)
    groups = [g for g in ("discriminating", "controls") if any(r["task"] == g for r in results)]
    goals = [goal(results, g) for g in [*groups, *args.tasks]]
    args.out.mkdir(parents=True, exist_ok=True)
    path = write_results(args.out, "gemma", args.quick, results, n_per_task=n, batch=args.batch, steps=args.steps,
                         torch_threads=torch.get_num_threads(), goal=goals)
    history = append_history(path, history_line(results, {"gemma": goals}, args.quick, n))
    plot_pareto(results, args.out / "pareto.png")
    print(markdown_table([r for r in results if r["task"] == groups[0]], COLUMNS))
    print("\n" + "\n".join(describe_goal(g) for g in goals))
    print(f"\nper-task rows, plot, history: {path}, {args.out / 'pareto.png'}, {history}")
    return 0
