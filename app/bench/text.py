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

Models (``--models``, default ``charlm charlm-block``) run side by side. The block-causal ``charlm-block`` decodes in
its own blocks of 4 and gets its own rows (full steps, the exact prefix cache, and over it parallel commits, the
robust statistics and both, which the bidirectional model runs too), each measured against its own uncached full
steps; every row's ``speedup_wall_vs_bidirectional`` divides the bidirectional model's full-steps time by its own.
``goals`` in the results says whether issue #27's goals were met. Each run appends its headline figures to
``DIR/history.jsonl``; ``--compare FILE`` prints each row's change against an earlier results.json.

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
from ...dllm.exact_cache import block_causal_layout
from ...dllm.generate import generate
from ...dllm.halting import HaltingRule, Prophet, SchED
from .history import GOAL_AGREEMENT, append_history, compare, compare_models, goals, history_line, load_earlier
from .text_plots import plot_pareto, plot_trace, plot_wall

PIPELINE_BLOCK = 8
PIPELINE_THRESHOLD = 0.95  # BlockRefinementScheduler's default: it also commits every token this probable
PARALLEL_THRESHOLD = 0.9
GAMMA = 4
# The embedded models run side by side by default: the bidirectional one and its block-causal twin (issue #27).
MODELS = ("charlm", "charlm-block")


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
        *robust_cache_methods(),
        Method("llada2-stock", {"block_length": PIPELINE_BLOCK, "scheduler": "BlockRefinementScheduler",
                                "threshold": PIPELINE_THRESHOLD}, pipeline="stock"),
        Method("llada2-sched-off", {"block_length": PIPELINE_BLOCK, "scheduler": "SchEDScheduler",
                                    "threshold": PIPELINE_THRESHOLD, "schedule": "never halts"}, pipeline="sched-off"),
        Method("llada2-sched", {"block_length": PIPELINE_BLOCK, "scheduler": "SchEDScheduler",
                                "threshold": PIPELINE_THRESHOLD, "schedule": cosine.to_dict()}, pipeline="sched"),
    ]


ROBUST_STATS = ("min", "quantile")


def robust_cache_methods() -> list[Method]:
    """SchED with the robust statistics (cosine), over the prefix cache, without and with parallel commits: the
    composed rows both models run (issue #27)."""
    cosine = ThresholdSchedule("cosine", 7.5, 2.5)
    out = []
    for parallel in (None, PARALLEL_THRESHOLD):
        for stat in ROBUST_STATS:
            params = {"cache": "prefix", "schedule": cosine.to_dict(), "stat": stat,
                      **({"q": 0.1} if stat == "quantile" else {}), **({"threshold": parallel} if parallel else {})}
            name = f"sched-cosine-{stat}" + ("+parallel" if parallel else "") + "+prefix"
            out.append(Method(name, params, halting=lambda st=stat: SchED(cosine, stat=st),
                              parallel_threshold=parallel, cache="prefix"))
    return out


def block_methods() -> list[Method]:
    """The rows of a block-causal model: full steps, the exact prefix cache, parallel commits over it, and the
    composed rows. No one-step, Prophet, dual-cache or pipeline rows: a block-causal model decodes in its own
    blocks, and Prophet and the dual cache are refused on it."""
    return [Method("full", {"steps": "full"}), Method("full+prefix", {"cache": "prefix"}, cache="prefix"),
            Method("parallel+prefix", {"cache": "prefix", "threshold": PARALLEL_THRESHOLD},
                   parallel_threshold=PARALLEL_THRESHOLD, cache="prefix"), *robust_cache_methods()]


def _run_generate(model, tok, method: Method, ids, attn, span: int):
    block, full_steps = DECODE[span]
    layout = block_causal_layout(model)
    if layout is not None:
        # A block-causal model decodes in its own blocks; an all-EOS block ends a sample.
        block, eos = layout[1], (tok.eos_token_id,)
    else:
        eos = ()
    steps, block_length = (1, span) if method.one_step else (full_steps, block)
    out = generate(model, ids, attention_mask=attn, gen_length=span, steps=steps, block_length=block_length,
                   mask_id=tok.mask_token_id, halting=method.halting() if method.halting else None,
                   parallel_threshold=method.parallel_threshold, cache=method.cache, eos_token_ids=eos)
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
    one_step = next((m for m in methods if m.one_step), None)
    _run_generate(model, tok, one_step or methods[0], ids, attn, layout.span_length)
    if any(m.pipeline for m in methods):
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
        params = {**method.params, "cache": method.cache, "parallel_threshold": method.parallel_threshold}
        rows.append({"task": task, "method": method.name, "params": params, "score": right / n,
                     "nfe": float(torch.cat(nfe).mean()), "seconds": seconds})
        bar.update(1)
    # Pipeline rows are measured against the stock pipeline (blocks of 8, truncated context, its own parallel
    # commits): a different regime from generate()'s full steps.
    baselines = {False: next(r for r in rows if r["method"] == "full"),
                 True: next((r for r in rows if r["method"] == "llada2-stock"), None)}
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
    one = next((r for r in rows if r["method"] == "one-step"), None)
    # A task that one-step decoding already solves as well as full steps measures nothing about halting (None: the
    # model has no one-step row).
    matches = None if one is None else one["score"] >= baselines[False]["score"]
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
                "task": group, "method": m.name, "params": per[0]["params"], "baseline": per[0]["baseline"],
                "tasks": sorted(tasks), "score": mean("score"), "full_score": mean("full_score"),
                "agreement": mean("agreement"), "nfe": mean("nfe"), "speedup_nfe": mean("speedup_nfe"),
                "speedup_wall": sum(r["seconds"] for r in full) / sum(r["seconds"] for r in per),
                "qps4": sum(qps) / len(qps) if qps else None, "seconds": sum(r["seconds"] for r in per),
            })
    return out


COLUMNS = [("model", "model", ""), ("task", "task", ""), ("method", "method", ""), ("score", "acc", ".3f"),
           ("full_score", "full acc", ".3f"),
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
    p.add_argument("--models", nargs="+", default=None, metavar="NAME",
                   help=f"embedded models to run side by side (default: {' '.join(MODELS)})")
    p.add_argument("--model", type=Path, default=None, help="one exported model folder instead of --models")
    p.add_argument("--compare", type=Path, default=None, metavar="FILE",
                   help="an earlier results.json: print each row's change of agreement, NFE and wall speedup")
    args = p.parse_args(argv)
    n = args.n if args.n is not None else (8 if args.quick else 200)
    if n <= 0 or args.batch <= 0:
        p.error("--n and --batch must be positive")
    if args.model is not None and args.models is not None:
        p.error("--model (one folder) and --models (embedded names) exclude each other; pass one of them")
    try:  # before any decoding: a bad file should not cost a whole run
        earlier = load_earlier(args.compare) if args.compare is not None else None
    except ValueError as e:
        p.error(str(e))

    from ..models import LoadError, load_text_model_or_embedded

    names = [str(args.model)] if args.model is not None else (args.models or list(MODELS))
    rows, loaded = [], []
    try:
        loaded = [(name, *load_text_model_or_embedded(name)) for name in names]
    except LoadError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    for name, model, tok in loaded:
        block_causal = block_causal_layout(model) is not None
        methods = block_methods() if block_causal else all_methods((tok.eos_token_id, tok.pad_token_id))
        mine = []
        with tqdm(total=len(args.tasks) * len(methods), desc=f"bench text {name}", unit="run") as bar:
            for task in args.tasks:
                bar.set_postfix_str(task)
                mine += run_task(model, tok, task, methods, n, args.batch, bar)
        mine += summarise(mine, methods)
        rows += [{"model": name, "block_causal": block_causal, **r} for r in mine]
    compare_models(rows)
    goal = goals(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    path = write_results(args.out, "text", args.quick, rows, n_per_task=n, torch_threads=torch.get_num_threads(),
                         goals=goal)
    history = append_history(path, history_line(rows, goal, args.quick, n))
    plot_pareto(rows, args.out / "pareto.png")
    plot_wall(rows, args.out / "wall.png")
    # The trace follows one run of the whole span, which a bidirectional model decodes; the long-form task shows
    # the most: its span is long and its margins rise slowly.
    traced = next(((model, tok) for _, model, tok in loaded if block_causal_layout(model) is None), None)
    plots = [args.out / "pareto.png", args.out / "wall.png"]
    if traced is not None:
        plot_trace(*traced, "chain" if "chain" in args.tasks else args.tasks[0], args.out / "trace.png")
        plots.append(args.out / "trace.png")
    headline = "discriminating" if any(r["task"] == "discriminating" for r in rows) else "controls"
    print(f"averaged over the {headline} tasks ({', '.join(next(r for r in rows if r['task'] == headline)['tasks'])}):")
    print(markdown_table([r for r in rows if r["task"] == headline], COLUMNS))
    flagged = sorted({r["task"] for r in rows if r.get("one_step_matches_full")})
    if flagged:
        print(f"\none-step decoding matches full steps on: {', '.join(flagged)} (these tasks cannot tell rules apart)")
    for task, g in goal.items():
        if isinstance(g, dict):
            best = g["best"]
            print(f"goal {goal['model']} {task}: >= {g['wall_at_least']:g}x wall at >= {100 * GOAL_AGREEMENT:g}% same "
                  f"as full: {'met' if g['met'] else 'not met'}" + (f" (best {best['method']}: "
                  f"{best['speedup_wall']:.2f}x, {100 * best['agreement']:.1f}%)" if best else ""))
    if earlier is not None:
        print(f"\nagainst {args.compare}:\n{compare(rows, earlier)}")
    print(f"\nper-task rows, plots: {path}, {', '.join(map(str, plots))}; history: {history}")
    return 0
