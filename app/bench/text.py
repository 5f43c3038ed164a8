"""``diffexit bench text``: SchED against full steps, one step, Prophet, parallel commits and KV caches, side by side.

Every method decodes the same held-out examples of every task with the embedded model (or ``--model DIR``),
greedy. Per task and method it reports accuracy, mean NFE (forward passes per sample), the NFE and wall-clock
speedups over full steps measured in the same run, ``QPS_4 = speedup_nfe * (score / full_score)^4``, and
``agreement``, the share of answers identical to full steps' (one minus the rate of answer-changing halts).
Rows run inside ``LLaDA2Pipeline`` are measured against the stock pipeline instead (field ``baseline``). Cached
rows (Fast-dLLM's ``prefix`` and ``dual`` caches, alone and with parallel commits and SchED) are measured against
uncached full steps: their NFE counts forward passes, each of which runs fewer tokens.

Decoding setup per layout (``diffexit.dllm.charlm.tasks.DECODE``): short tasks decode their 16-token span in 4
blocks of 4 at 16 steps; ``chain`` decodes 136 tokens in 4 blocks of 34 at 136 steps; "full" is one token per step.
The embedded model also runs inside diffusers' ``LLaDA2Pipeline`` (blocks of 8, one token per step), with the stock
``BlockRefinementScheduler`` and with ``SchEDScheduler``.

Averages: the controls (``reverse``, ``add``), which one-step decoding solves, cannot tell rules apart, so the
headline row (``task="discriminating"``) averages the other tasks; ``task="controls"`` averages the controls.

Writes ``DIR/results.json``, ``DIR/pareto.png`` (NFE speedup against accuracy), ``DIR/wall.png`` (wall-clock
speedup against the share of answers the same as full steps) and ``DIR/trace.png`` (one decoding run's margin
against SchED's threshold), and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from ...common.cli_help import HelpFormatter
from ...common.results import markdown_table, write_results
from ...common.schedules import ThresholdSchedule
from ...dllm.charlm.tasks import CONTROLS, DECODE, TASK_NAMES, layout_of, sample, score
from ...dllm.charlm.tokenizer import decode_answer, encode_prompts
from ...dllm.generate import generate
from ...dllm.halting import HaltingRule, Prophet, SchED
from .text_plots import plot_pareto, plot_trace, plot_wall

PIPELINE_BLOCK = 8
PIPELINE_THRESHOLD = 0.95  # BlockRefinementScheduler's default: it also commits every token this probable
PARALLEL_THRESHOLD = 0.9
GAMMA = 4


@dataclass
class Method:
    """One decoding configuration. ``halting`` builds a fresh rule per batch (rules keep per-sample state)."""

    name: str
    params: dict
    halting: Optional[Callable[[], HaltingRule]] = None
    parallel_threshold: Optional[float] = None
    one_step: bool = False
    cache: Optional[str] = None
    # Run inside LLaDA2Pipeline instead of generate(): "stock" (BlockRefinementScheduler), "sched"
    # (SchEDScheduler, cosine) or "sched-off" (SchEDScheduler that never halts: isolates the pass it saves at
    # each block end from what halting saves).
    pipeline: Optional[str] = None


def sched_methods() -> list[Method]:
    """The paper's grid: linear, cosine, and exp at k = 2, 4, 8, 16, each with low = 2.5 and low = 0."""
    out = []
    for low in (2.5, 0.0):
        kinds = [("linear", None), ("cosine", None)] + [("exp", k) for k in (2.0, 4.0, 8.0, 16.0)]
        for kind, k in kinds:
            sched = ThresholdSchedule(kind, 7.5, low, k=k)
            name = f"sched-{kind}" + (f"-k{k:g}" if k else "") + f"-low{low:g}"
            out.append(Method(name, {"schedule": sched.to_dict(), "stat": "mean"},
                              halting=lambda s=sched: SchED(s)))
    return out


# max_entropy halting compares minus the worst masked position's entropy (nats) with the schedule: from "every
# position below 0.1 nats" early on to "below 1 nat" at the end.
ENTROPY_SCHEDULE = ThresholdSchedule("linear", -0.1, -1.0)


def stat_methods(ignore_token_ids: tuple[int, ...]) -> list[Method]:
    """SchED with the statistics beyond the paper's mean, each at the paper's cosine (7.5 -> 2.5) and at a linear
    schedule down to 0; ``max_entropy`` at :data:`ENTROPY_SCHEDULE`. ``ignore_token_ids``: EOS and padding."""
    out = []
    for stat in ("median", "quantile", "min", "mean_content"):
        for sched in (ThresholdSchedule("cosine", 7.5, 2.5), ThresholdSchedule("linear", 7.5, 0.0)):
            ignore = ignore_token_ids if stat == "mean_content" else ()
            out.append(Method(f"sched-{sched.kind}-low{sched.low:g}-{stat}",
                              {"schedule": sched.to_dict(), "stat": stat, **({"q": 0.1} if stat == "quantile" else {})},
                              halting=lambda s=sched, st=stat, ig=ignore: SchED(s, stat=st, ignore_token_ids=ig)))
    out.append(Method("sched-max_entropy", {"schedule": ENTROPY_SCHEDULE.to_dict(), "stat": "max_entropy"},
                      halting=lambda: SchED(ENTROPY_SCHEDULE, stat="max_entropy")))
    return out


def cache_methods(schedule: ThresholdSchedule) -> list[Method]:
    """Each cache alone, with parallel commits, with SchED (``schedule``), and with both."""
    out = []
    for cache in ("prefix", "dual"):
        for name, halting, parallel in (("full", False, None), ("parallel", False, PARALLEL_THRESHOLD),
                                        ("sched-cosine", True, None),
                                        ("sched-cosine+parallel", True, PARALLEL_THRESHOLD)):
            params = {"cache": cache, **({"schedule": schedule.to_dict()} if halting else {}),
                      **({"threshold": parallel} if parallel else {})}
            out.append(Method(f"{name}+{cache}", params, halting=(lambda: SchED(schedule)) if halting else None,
                              parallel_threshold=parallel, cache=cache))
    return out


def all_methods(ignore_token_ids: tuple[int, ...]) -> list[Method]:
    """Every row of the benchmark; ``ignore_token_ids`` (EOS, padding) feed the ``mean_content`` statistic."""
    cosine = ThresholdSchedule("cosine", 7.5, 2.5)
    return [
        Method("full", {"steps": "full"}),
        Method("one-step", {"steps": 1}, one_step=True),
        *sched_methods(),
        *stat_methods(ignore_token_ids),
        Method("prophet", Prophet().to_dict(), halting=lambda: Prophet()),
        Method("parallel", {"threshold": PARALLEL_THRESHOLD}, parallel_threshold=PARALLEL_THRESHOLD),
        Method("sched-cosine+parallel", {"schedule": cosine.to_dict(), "threshold": PARALLEL_THRESHOLD},
               halting=lambda: SchED(cosine), parallel_threshold=PARALLEL_THRESHOLD),
        *cache_methods(cosine),
        Method("llada2-stock", {"block_length": PIPELINE_BLOCK, "scheduler": "BlockRefinementScheduler",
                                "threshold": PIPELINE_THRESHOLD}, pipeline="stock"),
        Method("llada2-sched-off", {"block_length": PIPELINE_BLOCK, "scheduler": "SchEDScheduler",
                                    "threshold": PIPELINE_THRESHOLD, "schedule": "never halts"}, pipeline="sched-off"),
        Method("llada2-sched", {"block_length": PIPELINE_BLOCK, "scheduler": "SchEDScheduler",
                                "threshold": PIPELINE_THRESHOLD, "schedule": cosine.to_dict()}, pipeline="sched"),
    ]


def _run_generate(model, tok, method: Method, ids, attn, span: int):
    block, full_steps = DECODE[span]
    steps, block_length = (1, span) if method.one_step else (full_steps, block)
    out = generate(model, ids, attention_mask=attn, gen_length=span, steps=steps, block_length=block_length,
                   mask_id=tok.mask_token_id, halting=method.halting() if method.halting else None,
                   parallel_threshold=method.parallel_threshold, cache=method.cache)
    return out.generated, out.nfe.float()


def _run_pipeline(model, tok, method: Method, ids, attn, span: int):
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline

    from ...samplers.sched_scheduler import SchEDScheduler

    stock = BlockRefinementScheduler(block_length=PIPELINE_BLOCK, num_inference_steps=PIPELINE_BLOCK,
                                     threshold=PIPELINE_THRESHOLD)
    if method.pipeline == "stock":
        scheduler = stock
    elif method.pipeline == "sched":
        scheduler = SchEDScheduler.from_config(stock.config, schedule="cosine")
    else:
        scheduler = SchEDScheduler.from_config(stock.config, schedule="constant", high=1e9, low=1e9)
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        pipe = LLaDA2Pipeline(model=model, scheduler=scheduler, tokenizer=tok)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(input_ids=ids, attention_mask=attn, gen_length=span, block_length=PIPELINE_BLOCK,
                   num_inference_steps=PIPELINE_BLOCK, editing_threshold=None, output_type="seq")
    finally:
        handle.remove()
    # The pipeline decodes the batch together: every sample takes part in every forward pass.
    return out.sequences, torch.full((ids.shape[0],), float(len(calls)))


def run_task(model, tok, task: str, methods: list[Method], n: int, batch: int, bar) -> list[dict]:
    layout = layout_of(task)
    examples = sample(task, "heldout", seed=0, n=n)
    # One untimed pass of each runner first, so no method's time includes one-off start-up costs; on two examples
    # and, for generate(), one step, so that it costs little even on the long span.
    ids, attn = encode_prompts(tok, [e.prompt for e in examples[:2]], layout.prompt_length)
    _run_generate(model, tok, next(m for m in methods if m.one_step), ids, attn, layout.span_length)
    _run_pipeline(model, tok, next(m for m in methods if m.pipeline), ids, attn, layout.span_length)
    rows, answers = [], {}
    for method in methods:
        right, nfe, seconds, answers[method.name] = 0, [], 0.0, []
        for i in range(0, n, batch):
            chunk = examples[i:i + batch]
            ids, attn = encode_prompts(tok, [e.prompt for e in chunk], layout.prompt_length)
            run = _run_pipeline if method.pipeline else _run_generate
            start = time.perf_counter()
            spans, chunk_nfe = run(model, tok, method, ids, attn, layout.span_length)
            seconds += time.perf_counter() - start
            nfe.append(chunk_nfe)
            texts = [decode_answer(tok, s) for s in spans]
            answers[method.name] += texts
            right += sum(score(task, e.prompt, t) for e, t in zip(chunk, texts))
        rows.append({"task": task, "method": method.name, "params": method.params, "score": right / n,
                     "nfe": float(torch.cat(nfe).mean()), "seconds": seconds})
        bar.update(1)
    # Pipeline rows are measured against the stock pipeline (blocks of 8, truncated context, its own parallel
    # commits): a different regime from generate()'s full steps.
    baselines = {False: next(r for r in rows if r["method"] == "full"),
                 True: next(r for r in rows if r["method"] == "llada2-stock")}
    for r, m in zip(rows, methods):
        full = baselines[m.pipeline is not None]
        r["baseline"] = full["method"]
        r["full_score"] = full["score"]
        # The share of answers identical to the baseline's: 1 - the rate of answer-changing halts. Unlike the
        # score it does not depend on how good the model is.
        r["agreement"] = sum(a == b for a, b in zip(answers[m.name], answers[full["method"]])) / n
        r["speedup_nfe"] = full["nfe"] / r["nfe"]
        r["speedup_wall"] = full["seconds"] / r["seconds"]
        r["qps4"] = (r["speedup_nfe"] * (r["score"] / full["score"]) ** GAMMA) if full["score"] > 0 else None
    one = next(r for r in rows if r["method"] == "one-step")
    # A task that one-step decoding already solves as well as full steps measures nothing about halting.
    matches = one["score"] >= baselines[False]["score"]
    for r in rows:
        r["one_step_matches_full"] = matches
    return rows


def summarise(rows: list[dict], methods: list[Method]) -> list[dict]:
    """Per method, a ``task="discriminating"`` row (means over the tasks that are not controls) and a
    ``task="controls"`` row, for the groups the run has (wall speedup: total full time / total time)."""
    out = []
    for group in ("discriminating", "controls"):
        tasks = {r["task"] for r in rows if (r["task"] in CONTROLS) == (group == "controls")}
        if not tasks:
            continue
        for m in methods:
            per = [r for r in rows if r["method"] == m.name and r["task"] in tasks]
            full = [r for r in rows if r["method"] == per[0]["baseline"] and r["task"] in tasks]
            qps = [r["qps4"] for r in per if r["qps4"] is not None]
            mean = lambda key: sum(r[key] for r in per) / len(per)
            out.append({
                "task": group, "method": m.name, "params": m.params, "baseline": per[0]["baseline"],
                "tasks": sorted(tasks), "score": mean("score"), "full_score": mean("full_score"),
                "agreement": mean("agreement"), "nfe": mean("nfe"), "speedup_nfe": mean("speedup_nfe"),
                "speedup_wall": sum(r["seconds"] for r in full) / sum(r["seconds"] for r in per),
                "qps4": sum(qps) / len(qps) if qps else None, "seconds": sum(r["seconds"] for r in per),
            })
    return out


COLUMNS = [("task", "task", ""), ("method", "method", ""), ("score", "acc", ".3f"), ("full_score", "full acc", ".3f"),
           ("agreement", "same as full", ".3f"),
           ("nfe", "NFE", ".1f"), ("speedup_nfe", "speedup NFE", ".2f"), ("speedup_wall", "speedup wall", ".2f"),
           ("qps4", "QPS_4", ".2f")]


def main(argv: list[str], prog: str = "diffexit bench text") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few examples per task: minutes, not an hour")
    p.add_argument("--out", type=Path, default=Path("runs/bench-text"), help="output folder (default: %(default)s)")
    p.add_argument("--n", type=int, default=None, help="held-out examples per task (default 200, quick 8)")
    p.add_argument("--batch", type=int, default=50, help="examples decoded together (default: %(default)s)")
    p.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=TASK_NAMES, metavar="TASK",
                   help=f"tasks to run (default: all of {', '.join(TASK_NAMES)})")
    p.add_argument("--model", type=Path, default=None, help="an exported model folder (default: the embedded one)")
    args = p.parse_args(argv)
    n = args.n if args.n is not None else (8 if args.quick else 200)
    if n <= 0 or args.batch <= 0:
        p.error("--n and --batch must be positive")

    from ..models import load_text_model_or_embedded

    try:
        model, tok = load_text_model_or_embedded(args.model)
    except ValueError as e:
        print(f"{prog}: cannot load the model: {e}", file=sys.stderr)
        return 1
    methods = all_methods((tok.eos_token_id, tok.pad_token_id))
    rows = []
    with tqdm(total=len(args.tasks) * len(methods), desc="bench text", unit="run") as bar:
        for task in args.tasks:
            bar.set_postfix_str(task)
            rows += run_task(model, tok, task, methods, n, args.batch, bar)
    rows += summarise(rows, methods)
    args.out.mkdir(parents=True, exist_ok=True)
    path = write_results(args.out, "text", args.quick, rows, n_per_task=n, torch_threads=torch.get_num_threads())
    plot_pareto(rows, args.out / "pareto.png")
    plot_wall(rows, args.out / "wall.png")
    # The long-form task shows the most: its span is long and its margins rise slowly.
    plot_trace(model, tok, "chain" if "chain" in args.tasks else args.tasks[0], args.out / "trace.png")
    headline = "discriminating" if any(r["task"] == "discriminating" for r in rows) else "controls"
    print(f"averaged over the {headline} tasks ({', '.join(next(r for r in rows if r['task'] == headline)['tasks'])}):")
    print(markdown_table([r for r in rows if r["task"] == headline], COLUMNS))
    flagged = sorted({r["task"] for r in rows if r.get("one_step_matches_full")})
    if flagged:
        print(f"\none-step decoding matches full steps on: {', '.join(flagged)} (these tasks cannot tell rules apart)")
    print(f"\nper-task rows, plots: {path}, {args.out / 'pareto.png'}, {args.out / 'wall.png'}, "
          f"{args.out / 'trace.png'}")
    return 0
