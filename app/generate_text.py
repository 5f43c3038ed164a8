"""``diffexit generate text``: answers from a masked-diffusion LM, at full steps or with a halting rule.

    diffexit generate text --task add --n 200 --method sched --schedule cosine:7.5:2.5 --out runs/gen-add
    diffexit generate text --prompts prompts.jsonl --config sched.json --out runs/gen-sched --compare-full
    diffexit generate text --prompts prompts.jsonl --model GSAI-ML/LLaDA-8B-Instruct --trust-remote-code \\
        --mask-id 126336 --dtype bfloat16 --gen-length 128 --steps 128 --block-length 32 --method sched --out runs/llada

Inputs: ``--prompts FILE``, a JSONL of ``{"id": ..., "prompt": ..., "task": ...}`` (``id`` optional, defaulting to
``line<number>``; ``task`` optional: one of the embedded tasks, which picks the prompt layout and scores the
answer); or ``--task NAME --n N``, N held-out prompts of an embedded task (``--seed`` picks the draw), with ids
``<task>-<i>``. Decoding is greedy, so an answer depends on neither the batch nor the process that makes it.

Models: the embedded model by default, or ``--model``:

- a folder holding the embedded model's format (``DiffusionLlama``, as ``diffexit train text --export`` writes):
  each prompt is left-padded to its task's layout (the short one when it has no task) and decoded with that
  layout's blocks and steps (``diffexit.dllm.tasks.DECODE``), as in ``diffexit bench text``;
- a ``DiffusionGemmaForBlockDiffusion`` folder (``diffexit train text --arch diffusion-gemma --export`` writes one):
  decoded by the model's own ``generate``, each item alone and seeded by its id; ``--steps`` sets the denoising
  steps per canvas and ``--gen-length`` the tokens of a prompt without a task; methods ``full`` and ``sched``
  (``schedule``, ``stat`` a canvas statistic of ``diffexit.dllm.statistics.STATISTICS``, ``q``, ``patience``);
  ``nfe`` counts decoder passes and ``halt_step`` is null (each canvas stops on its own);
- anything else goes through transformers: a folder, or a Hub id already in the local Hugging Face cache (nothing
  is downloaded here: ``hf download GSAI-ML/LLaDA-8B-Instruct`` first). ``--trust-remote-code`` for LLaDA and Dream;
  decoded with ``--gen-length``, ``--steps``, ``--block-length`` and ``--loop`` (``llada`` or ``dream``);
  ``--mask-id`` for tokenizers that declare no mask token (LLaDA: 126336).

Methods (``--method``, or ``--config FILE``; flags override the file):

- ``full``: every step.
- ``sched``: SchED halting. Parameters are those of :meth:`diffexit.dllm.SchED.to_dict`: ``schedule`` (``--schedule
  KIND:HIGH:LOW[:K]``, a number for a constant threshold, or a ``ThresholdSchedule`` object), ``stat``, ``q``,
  ``ignore_token_ids`` (defaults to the tokenizer's EOS and padding ids for ``stat="mean_content"``),
  ``min_progress``, ``patience``, ``max_change_ratio``. The file ``diffexit calibrate sched`` writes is accepted as is.
- ``prophet``: the Prophet baseline, as its reference decides: ``window`` (``--window``), ``answer_start`` (the span
  position the window starts at) and ``thresholds`` (early, middle, late).
- ``--commit learned|FILE`` instead: the learned commit rule (:mod:`diffexit.dllm.commit_rule`), ``learned-commit``
  or with ``--commit-mode halt`` ``learned-halt``.

A config file is ``{"method": ..., parameters...}``, or a ``diffexit calibrate sched`` file (``{"sched": {...}, ...}``).

Outputs in ``--out``: ``outputs.jsonl``, one record per prompt in input order: ``id``, ``prompt``, ``output``,
``method``, ``nfe`` (forward passes), ``halt_step`` (the pass at which the rule halted, or null), ``seconds`` (its
share of its batch's time), plus ``task`` and ``correct`` for prompts with a task. ``--compare-full`` also decodes at
full steps into ``OUT/full`` and reports the speedup. Resumable and ready for ``accelerate launch``: see
:mod:`diffexit.app.jobs`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..common.cli_help import HelpFormatter
from ..dllm.decode_spec import DecodeSpec, spec_from_options
from ..dllm.kv_cache import CACHES
from ..dllm.rule_spec import METHODS, PARAMS
from ..dllm.statistics import SPAN, describe
from .job_inputs import Item, JobError, check_keys, make_job, read_config, read_jsonl
from .jobs import (
    JobResult,
    check_job,
    describe_run,
    job_spec,
    lock_out_dir,
    prepare_out_dir,
    process_state,
    run_job,
    wall_speedup,
)
from .text_engines import EmbeddedEngine, GemmaEngine, TransformersEngine
from .text_model_options import DTYPES, LoadedTextModel, TextModelOptions, load_text_model

OUTPUTS = "outputs.jsonl"
FULL_DIR = "full"
# A transformers model's lengths when neither flag gives them; the embedded format decodes by task layout instead.
TRANSFORMERS_LENGTHS = {"gen_length": 128, "steps": 128}


def _parser(prog: str) -> argparse.ArgumentParser:
    from ..dllm.charlm.tasks import TASK_NAMES

    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", type=Path, metavar="FILE", help="JSONL of {id?, prompt, task?}")
    src.add_argument("--task", choices=TASK_NAMES, help="held-out prompts of an embedded task (with --n)")
    p.add_argument("--n", type=int, help="with --task: how many prompts")
    p.add_argument("--seed", type=int, default=0, help="with --task: which draw of held-out prompts (default: 0)")
    p.add_argument("--method", choices=METHODS, help="full (default), sched or prophet")
    p.add_argument("--schedule", metavar="SPEC", help="sched: the threshold, KIND:HIGH:LOW[:K] or a number")
    p.add_argument("--stat", help=f"sched: the span statistic; {describe(SPAN)}")
    p.add_argument("--window", type=int, help="prophet: answer window in tokens")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help='JSON {"method": ..., parameters...}, or a `diffexit calibrate sched` file')
    p.add_argument("--model", metavar="NAME",
                   help="charlm, charlm-block or gemma (the embedded models), a model folder, or a Hub id in the "
                        "local Hugging Face cache (default: charlm)")
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="transformers models: run the checkpoint's own code (LLaDA, Dream)")
    p.add_argument("--loop", choices=("llada", "dream"), help="transformers models: decoding loop (default: llada)")
    p.add_argument("--mask-id", type=int, help="transformers models: the mask token id, if the tokenizer has none")
    p.add_argument("--gen-length", type=int, help="transformers models: tokens to generate (default: 128)")
    p.add_argument("--steps", type=int, help="transformers models: decoding steps (default: 128)")
    p.add_argument("--block-length", type=int,
                   help="llada loop: block size (default: the task layout's, a block-causal model's own, or one block)")
    p.add_argument("--cache", choices=("none",) + CACHES,
                   help="llada loop: KV cache; prefix is exact on a block-causal model (default: none)")
    p.add_argument("--cache-refresh", metavar="K|confidence:C",
                   help="with --cache: rewrite the kept K/V at every K-th later step of a block, or at the step after "
                        "one that committed a token at probability <= C (default: never)")
    p.add_argument("--parallel-threshold", type=float, metavar="P",
                   help="llada loop: also commit every masked token of the block at least this probable")
    p.add_argument("--commit", metavar="learned|FILE", help="the learned commit rule instead of --method: 'learned' "
                   "(shipped beside the model's weights) or a file of `diffexit train commit`")
    p.add_argument("--commit-mode", choices=("commit", "halt"), help="commit and halt (default), or only halt")
    p.add_argument("--commit-threshold", type=float, metavar="P", help="clear above P in (0, 1] (default: calibrated)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="model weights' dtype (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch in a process (default: %(default)s)")
    p.add_argument("--compare-full", action="store_true",
                   help="also decode at full steps into OUT/full; report the speedup")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="output folder (resumed if it holds this job)")
    return p


# Inputs --------------------------------------------------------------------------------------------------------------

def task_items(task: str, n: Optional[int], seed: int) -> list[Item]:
    """``n`` held-out prompts of ``task`` (draw ``seed``), ids ``<task>-<i:05d>``."""
    from ..dllm.charlm.tasks import sample

    if n is None or n < 1:
        raise JobError(f"--task needs --n, a positive number of prompts, got {n}")
    return [Item(f"{task}-{i:05d}", None, {"prompt": ex.prompt, "task": task}, source=f"--task {task} #{i}")
            for i, ex in enumerate(sample(task, "heldout", seed, n))]


def read_prompts(path: Path) -> list[Item]:
    """Items from a JSONL of ``{"id"?, "prompt", "task"?}``; a bad line raises, naming its number."""
    from ..dllm.charlm.tasks import TASK_NAMES, score

    items = []
    for number, row in read_jsonl(path):
        where = f"{path} line {number}"
        check_keys(row, ("id", "prompt", "task"), where)
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise JobError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
        payload = {"prompt": prompt}
        if "task" in row:
            task = row["task"]
            if task not in TASK_NAMES:
                raise JobError(f"{where}: unknown task {task!r}; choose one of {list(TASK_NAMES)} or leave it out")
            try:
                score(task, prompt, "")
            except ValueError as e:
                raise JobError(f"{where}: {e}") from e
            payload["task"] = task
        item_id = row.get("id", f"line{number:05d}")
        if not isinstance(item_id, str) or not item_id:
            raise JobError(f"{where}: 'id' must be a non-empty string, got {item_id!r}")
        items.append(Item(item_id, None, payload, source=where))
    return items


# Methods -------------------------------------------------------------------------------------------------------------

def resolve_method(args) -> tuple[str, dict]:
    """``(method, params)`` from ``--config`` and the flags (flags win), in JSON form; checked against the
    tokenizer once the model is loaded (:func:`diffexit.dllm.rule_spec.check_halting_params`)."""
    config: dict = {}
    if args.config:
        data = read_config(args.config)
        if "sched" in data:
            from ..dllm.calibrate import load_sched

            try:
                config = {"method": "sched", **load_sched(args.config).to_dict()}
            except (TypeError, ValueError) as e:
                raise JobError(f"config file {args.config}: {e}") from e
        else:
            keys = ("method",) + tuple(dict.fromkeys(k for v in PARAMS.values() for k in v))
            check_keys(data, keys, f"config file {args.config}")
            config = data
    method = args.method or config.get("method", "full")
    if method not in METHODS:
        raise JobError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    params = {k: v for k, v in config.items() if k != "method"}
    flags = {"schedule": args.schedule, "stat": args.stat, "window": args.window}
    params.update({k: v for k, v in flags.items() if v is not None})
    for key in params:
        if key not in PARAMS[method]:
            owners = [m for m, keys in PARAMS.items() if key in keys]
            raise JobError(f"{key} is a parameter of method {' and '.join(map(repr, owners))}, not of {method!r}; "
                           f"drop it or pick --method {owners[0]}")
    return method, params


def loop_options(args) -> DecodeSpec:
    """The loop's options from the flags (lengths, ``--cache``, ``--parallel-threshold``), checked before anything
    loads; the loop, the default lengths and the method join them once the model's kind is known."""
    commit = getattr(args, "commit", None)
    if commit not in (None, "learned"):
        if not Path(commit).is_file():
            raise JobError(f"--commit {commit}: no such file; give 'learned' or a file `diffexit train commit` wrote")
        commit = str(Path(commit).resolve())  # job.json must name the same file from any folder
    flags = {"gen_length": args.gen_length, "steps": args.steps, "block_length": args.block_length,
             "cache": None if args.cache == "none" else args.cache, "cache_refresh": args.cache_refresh,
             "parallel_threshold": args.parallel_threshold,
             "commit": commit, "commit_mode": getattr(args, "commit_mode", None),
             "commit_threshold": getattr(args, "commit_threshold", None)}
    try:
        return spec_from_options({k: v for k, v in flags.items() if v is not None})
    except ValueError as e:
        raise JobError(str(e)) from None


def with_method(spec: DecodeSpec, method: str, params: dict, tokenizer) -> DecodeSpec:
    """``spec`` with the halting method, completed for this tokenizer (EOS and padding for
    ``stat="mean_content"``) and checked."""
    try:
        return spec.replace(method=method, params=params).for_tokenizer(tokenizer)
    except ValueError as e:
        raise JobError(f"method {method!r}: {e}") from e


# Models and decoding -------------------------------------------------------------------------------------------------

def model_options(args) -> TextModelOptions:
    """Which model the flags name, and how to load it."""
    return TextModelOptions(model=args.model, dtype=args.dtype, loop=args.loop, mask_id=args.mask_id,
                            trust_remote_code=args.trust_remote_code)


def _gemma_learned(loop: DecodeSpec, model, name: str):
    """DiffusionGemma's learned stopping rule from ``--commit``, checked against ``model`` before any decode."""
    from ..dllm.gemma_commit import LearnedStopping
    if loop.commit_mode != "halt":
        raise JobError("--commit on a DiffusionGemma model stops a sample's canvas once every token clears; uniform "
                       "diffusion has no masks to commit one by one: add --commit-mode halt")
    try:
        return LearnedStopping(loop.commit, loop.commit_threshold).bind(model)
    except ValueError as e:
        raise JobError(f"{name}: {e}") from e


def build_engines(loaded: LoadedTextModel, method: str, params: dict, loop: DecodeSpec):
    """``(engine, full_engine, decode)`` for a loaded model (:func:`~diffexit.app.text_model_options.load_text_model`):
    the method's engine, the full-steps one, and the decoding settings ``job.json`` records. ``loop`` holds the
    decoding options the user gave (lengths, block length, cache, parallel commits, commit rule); ``diffexit eval``
    builds its engine here too, so both decode alike."""
    options, kind, model, tokenizer = loaded.options, loaded.kind, loaded.model, loaded.tokenizer
    flag = lambda name: f"--{name.replace('_', '-')}"  # noqa: E731
    if kind == "gemma":
        from ..dllm.rule_spec import gemma_stopping

        given = [flag(k) for k in options.given_transformers_only()]
        given += [flag(k) for k in ("block_length", "cache", "cache_refresh", "parallel_threshold")
                  if getattr(loop, k) is not None]
        if given:
            raise JobError(f"{', '.join(given)}: not for a DiffusionGemma model, which decodes with its own generate "
                           f"(--steps per canvas, --gen-length)")
        if loop.commit is not None:
            make_rule = lambda: _gemma_learned(loop, model, options.model)  # noqa: E731
            method, params = "learned-halt", {"commit": loop.commit, "threshold": make_rule().threshold}
        else:
            try:
                rule = gemma_stopping(method, params)
            except ValueError as e:
                raise JobError(f"{options.model}: {e}") from e
            params = {} if rule is None else rule.to_dict()
            make_rule = None if rule is None else (lambda: gemma_stopping(method, params))
        decode = {"gen_length": loop.gen_length, "steps": loop.steps, "method": method, "params": params}
        engine = GemmaEngine(model, tokenizer, method, make_rule, loop.steps, loop.gen_length)
        full_engine = GemmaEngine(model, tokenizer, "full", None, loop.steps, loop.gen_length)
    else:
        if kind == "embedded":
            from ..dllm.exact_cache import block_causal_layout

            given = [flag(k) for k in TRANSFORMERS_LENGTHS if getattr(loop, k) is not None]
            given += [flag(k) for k in options.given_transformers_only()]
            if given:
                raise JobError(f"{', '.join(given)} apply to models loaded through transformers; the embedded "
                               f"model's format decodes each prompt with its task layout")
            if loop.cache_refresh is not None and block_causal_layout(model) is not None:
                # Said before any work: the loop would refuse it only at its first batch.
                raise JobError("--cache-refresh refreshes the approximate cache of a bidirectional model; on this "
                               "block-causal model --cache prefix is exact and never stale: drop --cache-refresh")
        else:
            try:
                loop = loop.replace(loop=options.transformers_setting("loop")).with_lengths(
                    TRANSFORMERS_LENGTHS["gen_length"], TRANSFORMERS_LENGTHS["steps"], None)
            except ValueError as e:
                raise JobError(str(e)) from None
        spec = with_method(loop, method, params, tokenizer)
        full = spec.replace(method="full", params={}, commit=None, commit_mode="commit", commit_threshold=None)
        if kind == "embedded":
            engine, full_engine = EmbeddedEngine(model, tokenizer, spec), EmbeddedEngine(model, tokenizer, full)
        else:
            engine, full_engine = TransformersEngine(model, spec), TransformersEngine(model, full)
        decode = {"decode": spec.to_dict()}
        if kind == "transformers":
            decode.update(mask_id=options.mask_id, trust_remote_code=options.transformers_setting("trust_remote_code"))
    return engine, full_engine, decode


def _model_id(model: Optional[str]) -> str:
    if model is None:
        return "embedded"
    return str(Path(model).resolve()) if Path(model).exists() else model


# The command ---------------------------------------------------------------------------------------------------------

def run(argv: Sequence[str], prog: str = "diffexit generate text") -> tuple[JobResult, Optional[JobResult]]:
    """Parse ``argv``, generate, print the summary on the main process; returns the method's and full steps'
    :class:`~diffexit.app.jobs.JobResult` (None without ``--compare-full``). Bad input raises :class:`JobError`."""
    args = _parser(prog).parse_args(list(argv))
    if args.n is not None and args.task is None:
        raise JobError("--n goes with --task; a --prompts file lists its prompts")
    if args.batch_size < 1:
        raise JobError(f"--batch-size must be positive, got {args.batch_size}")
    for name in ("gen_length", "steps", "block_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise JobError(f"--{name.replace('_', '-')} must be positive, got {value}")
    method, params = resolve_method(args)
    loop = loop_options(args)
    items = read_prompts(args.prompts) if args.prompts else task_items(args.task, args.n, args.seed)
    out = prepare_out_dir(args.out)

    state = process_state()
    # Held from before the model loads: a folder another job is writing is refused before that work.
    with lock_out_dir(out, state):
        return _generate(args, out, state, method, params, loop, items)


def _generate(args, out: Path, state, method: str, params: dict, loop: DecodeSpec,
              items: list[Item]) -> tuple[JobResult, Optional[JobResult]]:
    """:func:`run`'s work once the inputs are checked and the folder is locked."""
    loaded = load_text_model(model_options(args), state.device)
    kind = loaded.kind
    engine, full_engine, decode = build_engines(loaded, method, params, loop)
    engine.check(items)
    method = method if loop.commit is None else f"learned-{loop.commit_mode}"  # the rule replaces method 'full'

    job = make_job(items, args.batch_size, group=engine.group)
    settings = {"command": "generate text", "model": _model_id(loaded.options.model), "dtype": args.dtype,
                "batch_size": args.batch_size}
    spec = job_spec({**settings, **decode}, job)
    full_decode = ({**decode, "method": "full", "params": {}} if kind == "gemma"
                   else {**decode, "decode": full_engine.spec.to_dict()})
    full_spec = job_spec({**settings, **full_decode}, job)
    compare = args.compare_full and method != "full"
    check_job(out, spec)
    if compare:
        check_job(out / FULL_DIR, full_spec)

    result = run_job(out, spec, job, engine, manifest=OUTPUTS, desc=f"text ({method})", state=state)
    full = None
    if compare:
        full = run_job(prepare_out_dir(out / FULL_DIR), full_spec, job, full_engine, manifest=OUTPUTS,
                       desc="text (full)", state=state)
    if state.is_main_process:
        _summarise(result, full, method, args.compare_full)
    return result, full


def _summarise(result: JobResult, full: Optional[JobResult], method: str, compare_full: bool) -> None:
    records = result.records
    print(describe_run(result, f"generate text ({method})"))
    nfe = sum(r["nfe"] for r in records) / len(records)
    scored = [r for r in records if "correct" in r]
    line = f"mean NFE {nfe:.2f}"
    if scored:
        line += f"; correct {sum(r['correct'] for r in scored)}/{len(scored)} of the prompts with a task"
    print(line)
    if compare_full and full is None:
        print("--compare-full: the method is full steps already; nothing to compare")
    if full is not None:
        print(describe_run(full, "full steps"))
        full_nfe = sum(r["nfe"] for r in full.records) / len(full.records)
        same = sum(a["output"] == b["output"] for a, b in zip(records, full.records))
        line = (f"speedup over full steps: {full_nfe / nfe:.2f}x NFE, {wall_speedup(full.records, records):.2f}x wall "
                f"clock (per-item seconds summed); {same}/{len(records)} answers identical to full steps")
        if scored:
            line += f"; full steps correct {sum(r['correct'] for r in full.records if 'correct' in r)}/{len(scored)}"
        print(line)


def main(argv: list[str], prog: str = "diffexit generate text") -> int:
    try:
        run(argv, prog)
    except JobError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
