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
A model that ships a learned commit rule beside its weights (``diffexit train commit``) also gets its rows,
``learned-commit`` and ``learned-halt`` at the calibrated thresholds, uncached and over the prefix cache. ``--methods``
runs a subset by name (full steps always run). ``goals`` in the results says whether issue #27's goals and issue
#31's halting goal and learned-commit goal (``learned_vs_parallel``) were met. Each run appends its
headline figures to ``DIR/history.jsonl``; ``--compare FILE`` prints each row's change against an earlier
results.json.

Oracle rows, per model, from a recorded (untimed) full-steps run of the same batch: ``oracle-halt`` halts each sample
at the first pass whose masked argmax is the full-steps answer, the fewest passes any span-halting rule can take and
keep every answer (:mod:`diffexit.dllm.oracle`); every halting row reports its passes over it
(``passes_over_oracle``). ``oracle-commit`` commits each token at the first pass after which its argmax never
changes in the recording: a reference point, not a bound (committing early changes what later passes see).

Wall-clock: every row of a task is timed interleaved with the others, ``REPEATS`` times (median ``seconds``, the
slowest minus the fastest repeat in ``seconds_spread``); a row whose wall ratio is outside 0.5-1.5x its pass ratio,
both against full steps over the same cache, is ``noisy`` (:mod:`diffexit.app.bench.timing`).

Averages: the controls (``reverse``, ``add``), which one-step decoding solves, cannot tell rules apart, so the
headline row (``task="discriminating"``) averages the other tasks; ``task="controls"`` averages the controls.

Writes ``DIR/results.json``, ``DIR/pareto.png`` (NFE speedup against accuracy), ``DIR/wall.png`` (wall-clock
speedup against the share of answers the same as full steps) and ``DIR/trace.png`` (one decoding run's margin
against SchED's threshold), and prints a markdown table.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ...common.cli_help import HelpFormatter
from ...common.results import markdown_table, write_results
from ...dllm.charlm.tasks import CONTROLS, DECODE, TASK_NAMES, layout_of, sample, score
from ...dllm.charlm.tokenizer import decode_answer, encode_prompts
from ...dllm.exact_cache import block_causal_layout
from ...dllm.generate import generate
from ...dllm.oracle import HaltingOracle, Recording, record_full_steps
from .history import append_history, compare, compare_models, goal_lines, goals, history_line, load_earlier
from .rows import bench_row
from .text_methods import (COMMIT_ORACLE_NOTE, PIPELINE_BLOCK, PIPELINE_THRESHOLD, Method, all_methods, block_methods,
                           learned_methods, select)
from .text_plots import plot_pareto, plot_trace, plot_wall
from .timing import REPEATS, is_noisy, time_interleaved

GAMMA = 4
# The embedded models run side by side by default: the bidirectional one and its block-causal twin (issue #27).
MODELS = ("charlm", "charlm-block")


def _decode_kwargs(model, tok, method: Method, span: int) -> dict:
    """``generate``'s decoding arguments for ``method`` on a span of ``span`` (rule, cache and parallel commits
    apart)."""
    block, full_steps = DECODE[span]
    layout = block_causal_layout(model)
    if layout is not None:
        # A block-causal model decodes in its own blocks; an all-EOS block ends a sample.
        block, eos = layout[1], (tok.eos_token_id,)
    else:
        eos = ()
    steps, block_length = (1, span) if method.one_step else (full_steps, block)
    return dict(gen_length=span, steps=steps, block_length=block_length, mask_id=tok.mask_token_id,
                eos_token_ids=eos)


def _run_generate(model, tok, method: Method, ids, attn, span: int, recording: Recording):
    halting = HaltingOracle(recording.final) if method.oracle == "halt" else \
        method.halting() if method.halting else None
    out = generate(model, ids, attention_mask=attn, halting=halting, parallel_threshold=method.parallel_threshold,
                   cache=method.cache, cache_refresh=method.cache_refresh,
                   **_decode_kwargs(model, tok, method, span))
    return out.generated, out.nfe.float()


def _run_pipeline(model, tok, method: Method, ids, attn, span: int, recording: Recording):
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


def _decodes(model, tok, method: Method, chunks, recordings, span: int, bar) -> Callable[[], tuple]:
    """The timed work of ``method``: decoding every chunk; returns ``(spans per chunk, nfe [n])``."""
    run = _run_pipeline if method.pipeline else _run_generate

    def call():
        got = [run(model, tok, method, ids, attn, span, rec) for (_, ids, attn), rec in zip(chunks, recordings)]
        bar.update(1)
        return [g[0] for g in got], torch.cat([g[1] for g in got])
    return call


def run_task(model, tok, task: str, methods: list[Method], n: int, batch: int, bar) -> list[dict]:
    """Every method's per-task row of ``task``: decoded on ``n`` held-out examples in batches of ``batch``, timed
    interleaved (:func:`~diffexit.app.bench.timing.time_interleaved`), ``REPEATS`` times; ``bar`` counts decodes."""
    layout = layout_of(task)
    examples = sample(task, "heldout", seed=0, n=n)
    chunks = [(examples[i:i + batch], *encode_prompts(tok, [e.prompt for e in examples[i:i + batch]],
                                                       layout.prompt_length)) for i in range(0, n, batch)]
    full = next(m for m in methods if m.name == "full")
    # The recorded full steps, untimed, feed the oracles; they are also every runner's warm-up, so no timed call
    # includes one-off start-up costs.
    recordings = [record_full_steps(model, ids, attention_mask=attn, **_decode_kwargs(model, tok, full,
                                                                                      layout.span_length))
                  for _, ids, attn in chunks]
    if any(m.pipeline for m in methods):
        _, ids, attn = chunks[0]
        _run_pipeline(model, tok, next(m for m in methods if m.pipeline), ids[:2], attn[:2], layout.span_length,
                      recordings[0])
    timed = time_interleaved({m.name: _decodes(model, tok, m, chunks, recordings, layout.span_length, bar)
                              for m in methods if m.oracle != "commit"}, REPEATS)
    rows, answers = [], {}
    for method in methods:
        if method.oracle == "commit":
            # Its answers are the recorded ones by construction; only its passes are counted.
            spans, nfe = [rec.final for rec in recordings], torch.cat([rec.commit_oracle_nfe() for rec in recordings])
            clock = {"seconds": None, "seconds_spread": None, "repeats": 0}
        else:
            (spans, nfe), clock = timed[method.name].result, timed[method.name].figures()
        answers[method.name] = [decode_answer(tok, s) for chunk in spans for s in chunk]
        right = sum(score(task, e.prompt, t) for e, t in zip(examples, answers[method.name]))
        rows.append(bench_row(method.identity, task=task, score=right / n, nfe=float(nfe.float().mean()), **clock,
                              halts=method.halts))
    _relate(rows, methods, answers, n)
    return rows


def _relate(rows: list[dict], methods: list[Method], answers: dict, n: int) -> None:
    """Each per-task row's figures against its baseline, its cost reference (noisy) and the halting oracle."""
    by = {r["method"]: r for r in rows}
    oracle = by.get("oracle-halt")
    for r, m in zip(rows, methods):
        # Pipeline rows are measured against the stock pipeline (blocks of 8, truncated context, its own parallel
        # commits): a different regime from generate()'s full steps.
        full = by["llada2-stock"] if m.pipeline else by["full"]
        r["baseline"] = full["method"]
        r["full_score"] = full["score"]
        # The share of answers identical to the baseline's: 1 - the rate of answer-changing halts. Unlike the
        # score it does not depend on how good the model is.
        r["agreement"] = sum(a == b for a, b in zip(answers[m.name], answers[full["method"]])) / n
        r["speedup_nfe"] = full["nfe"] / r["nfe"]
        r["speedup_wall"] = None if r["seconds"] is None else full["seconds"] / r["seconds"]
        r["qps4"] = (r["speedup_nfe"] * (r["score"] / full["score"]) ** GAMMA) if full["score"] > 0 else None
        # Wall-clock should track passes against a row whose passes cost the same: full steps over the same cache
        # (a cached pass runs fewer tokens than an uncached one).
        ref = by.get("full" if m.cache is None else f"full+{m.cache}", full) if not m.pipeline else full
        r["noisy"] = None if r["seconds"] is None else is_noisy(ref["seconds"] / r["seconds"], ref["nfe"] / r["nfe"])
        r["passes_over_oracle"] = r["nfe"] / oracle["nfe"] if m.halts and oracle and not m.pipeline else None
    one = by.get("one-step")
    # A task that one-step decoding already solves as well as full steps measures nothing about halting (None: the
    # model has no one-step row).
    matches = None if one is None else one["score"] >= by["full"]["score"]
    for r in rows:
        r["one_step_matches_full"] = matches


def summarise(rows: list[dict], methods: list[Method]) -> list[dict]:
    """Per method, a ``task="discriminating"`` row (means over the tasks that are not controls) and a
    ``task="controls"`` row, for the groups the run has. Wall speedup: total full time over total time; seconds and
    their spread: sums over the tasks; noisy: whether any task's row is."""
    out = []
    for group in ("discriminating", "controls"):
        tasks = {r["task"] for r in rows if (r["task"] in CONTROLS) == (group == "controls")}
        if not tasks:
            continue
        for m in methods:
            per = [r for r in rows if r["method"] == m.name and r["task"] in tasks]
            full = [r for r in rows if r["method"] == per[0]["baseline"] and r["task"] in tasks]
            mean = lambda key: sum(r[key] for r in per) / len(per)
            known = lambda key: all(r[key] is not None for r in per)
            total = lambda key, these: sum(r[key] for r in these) if known(key) else None
            qps = [r["qps4"] for r in per if r["qps4"] is not None]
            out.append(bench_row(
                m.identity, task=group, baseline=per[0]["baseline"], tasks=sorted(tasks), score=mean("score"),
                full_score=mean("full_score"), agreement=mean("agreement"), nfe=mean("nfe"),
                speedup_nfe=mean("speedup_nfe"),
                speedup_wall=total("seconds", full) / total("seconds", per) if known("seconds") else None,
                qps4=sum(qps) / len(qps) if qps else None, seconds=total("seconds", per),
                seconds_spread=total("seconds_spread", per), repeats=per[0]["repeats"], halts=m.halts,
                noisy=any(r["noisy"] for r in per) if known("noisy") else None,
                passes_over_oracle=mean("passes_over_oracle") if known("passes_over_oracle") else None))
    return out


COLUMNS = [("model", "model", ""), ("task", "task", ""), ("method", "method", ""), ("score", "acc", ".3f"),
           ("full_score", "full acc", ".3f"),
           ("agreement", "same as full", ".3f"),
           ("nfe", "NFE", ".1f"), ("speedup_nfe", "speedup NFE", ".2f"), ("passes_over_oracle", "NFE / oracle", ".2f"),
           ("speedup_wall", "speedup wall", ".2f"), ("seconds", "s", ".2f"), ("seconds_spread", "+- s", ".2f"),
           ("noisy", "noisy", ""), ("qps4", "QPS_4", ".2f")]


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
    p.add_argument("--methods", nargs="+", default=None, metavar="PATTERN",
                   help="run only the rows whose method name matches one of these fnmatch patterns (quote them: "
                        "'learned-*'); full steps always run, every row is measured against them (default: all)")
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
    every = [(block_methods() if block_causal_layout(model) is not None else
              all_methods((tok.eos_token_id, tok.pad_token_id))) + learned_methods(model) for _, model, tok in loaded]
    if args.methods is not None:
        known = sorted({m.name for methods in every for m in methods})
        unmatched = [pat for pat in args.methods if not any(fnmatch.fnmatchcase(name, pat) for name in known)]
        if unmatched:
            p.error(f"--methods {' '.join(unmatched)} matches no method of {', '.join(names)}; the methods are: "
                    f"{', '.join(known)}")
        every = [select(methods, args.methods) for methods in every]
    for (name, model, tok), methods in zip(loaded, every):
        block_causal = block_causal_layout(model) is not None
        if not any(m.family.startswith("learned-") for m in methods) and args.methods is None:
            print(f"{name}: no learned commit rule beside its weights, so no learned-* rows (`diffexit train commit`)")
        mine = []
        decodes = len(args.tasks) * REPEATS * sum(m.oracle != "commit" for m in methods)
        with tqdm(total=decodes, desc=f"bench text {name}", unit="run") as bar:
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
    if any(r["method"] == "oracle-commit" for r in rows):
        print(f"\noracle-commit is {COMMIT_ORACLE_NOTE}")
    for line in goal_lines(goal):
        print(line)
    if earlier is not None:
        print(f"\nagainst {args.compare}:\n{compare(rows, earlier)}")
    print(f"\nper-task rows, plots: {path}, {', '.join(map(str, plots))}; history: {history}")
    return 0
