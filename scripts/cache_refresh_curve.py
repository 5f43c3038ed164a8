"""The approximate KV cache's refresh policies on the embedded bidirectional model: agreement with uncached full
steps against wall-clock speedup (issue #27).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/cache_refresh_curve.py --n 48 --n-chain 8 --out runs/cache-refresh

Every setting decodes the same held-out prompts of the discriminating tasks (draw 0, as ``diffexit bench text``
draws them; ``--tasks``, default pick zip trio chain; ``--n`` prompts of each short task, ``--n-chain`` of chain) at
full steps with the task layout's blocks
(``diffexit.dllm.charlm.tasks.DECODE``), greedy, with ``generate(cache=..., cache_refresh=...)``: the plain cache
(no refresh), every ``k``-th later step of a block, and ``confidence:C`` (the step after one that committed a token
at probability ``<= C``). Per task the rows are timed interleaved with uncached full steps
(:func:`diffexit.app.bench.timing.time_interleaved`, 3 repeats, medians).

Per setting and task: ``agreement`` (the share of answers identical to uncached full steps'), ``speedup_wall``
(uncached full steps' median seconds over the row's), ``token_share`` (tokens run through the model over uncached
full steps': the cost the clock should track) and ``whole_passes`` (whole-sequence passes per sample). The
``task="discriminating"`` row averages agreement over the tasks and divides the summed seconds, as the bench's
headline row does. Writes ``OUT/results.json`` and ``OUT/curve.png`` (agreement against wall-clock speedup) and
prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffexit.app.bench.timing import REPEATS, time_interleaved
from diffexit.app.models import load_text_model_or_embedded
from diffexit.common.results import markdown_table, write_results
from diffexit.dllm.charlm.tasks import DECODE, layout_of, sample
from diffexit.dllm.charlm.tokenizer import decode_answer, encode_prompts
from diffexit.dllm.generate import generate

TASKS = ("pick", "zip", "trio", "chain")
# (cache, cache_refresh): the plain caches, a refresh at every other later step, and confidence levels from "only
# near-ties" to "nearly every commit"; the dual cache at the level an earlier exploration found promising (0.9).
SETTINGS = ([("prefix", None), ("dual", None), ("prefix", 2)]
            + [("prefix", f"confidence:{c}") for c in (0.5, 0.8, 0.9, 0.95)] + [("dual", "confidence:0.9")])
# chain decodes 136 tokens at 136 steps over a 158-token sequence: one of its decodes costs about 30 short ones, so
# it gets fewer prompts to keep a run near 15 minutes on one thread.
LONG_TASKS = ("chain",)


def name_of(cache, refresh) -> str:
    if cache is None:
        return "full"
    return f"full+{cache}" + ("" if refresh is None else f"+refresh-{refresh}".replace("confidence:", "conf"))


def run_task(model, tok, task: str, n: int, bar) -> list[dict]:
    layout = layout_of(task)
    block, steps = DECODE[layout.span_length]
    examples = sample(task, "heldout", seed=0, n=n)
    ids, attn = encode_prompts(tok, [e.prompt for e in examples], layout.prompt_length)
    whole = ids.shape[1] + layout.span_length
    settings = [(None, None)] + list(SETTINGS)
    # Per row: tokens run through the model and whole-sequence passes (sample rows), over its timed repeats.
    counts = {name_of(*s): [0, 0] for s in settings}
    running = [None]

    def count(_, args, kwargs):
        ids_in = args[0] if args else kwargs["input_ids"]
        counts[running[0]][0] += ids_in.numel()
        counts[running[0]][1] += ids_in.shape[0] if ids_in.shape[1] == whole else 0

    def decode(cache, refresh):
        def call():
            running[0] = name_of(cache, refresh)
            out = generate(model, ids, attention_mask=attn, mask_id=tok.mask_token_id, gen_length=layout.span_length,
                           steps=steps, block_length=block, cache=cache, cache_refresh=refresh)
            bar.update(1)
            return [decode_answer(tok, s) for s in out.generated]
        return call

    decode(None, None)()  # warm-up, untimed and uncounted
    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        timed = time_interleaved({name_of(*s): decode(*s) for s in settings}, REPEATS)
    finally:
        handle.remove()
    full_answers, full = timed["full"].result, timed["full"]
    full_tokens = counts["full"][0]
    rows = []
    for cache, refresh in settings:
        name = name_of(cache, refresh)
        t, (tokens, whole_passes) = timed[name], counts[name]
        rows.append({"method": name, "task": task, "cache": cache, "cache_refresh": refresh,
                     "agreement": sum(a == b for a, b in zip(t.result, full_answers)) / n,
                     "speedup_wall": full.median / t.median, **t.figures(),
                     "token_share": tokens / full_tokens, "whole_passes": whole_passes / REPEATS / n})
    return rows


def summarise(rows: list[dict], tasks) -> list[dict]:
    """Per setting, the ``task="discriminating"`` row: mean agreement, summed seconds' ratio, mean token share."""
    out = []
    full_seconds = sum(r["seconds"] for r in rows if r["method"] == "full")
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        seconds = sum(r["seconds"] for r in mine)
        out.append({"method": name, "task": "discriminating", "tasks": list(tasks), "cache": mine[0]["cache"],
                    "cache_refresh": mine[0]["cache_refresh"],
                    "agreement": sum(r["agreement"] for r in mine) / len(mine),
                    "min_task_agreement": min(r["agreement"] for r in mine),
                    "speedup_wall": full_seconds / seconds, "seconds": seconds,
                    "token_share": sum(r["token_share"] for r in mine) / len(mine)})
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family, marker in (("period", "s"), ("confidence", "o"), ("plain", "^"), ("full", "*")):
        mine = [r for r in rows if _family(r) == family]
        for cache, colour in (("prefix", "tab:blue"), ("dual", "tab:orange"), (None, "black")):
            pts = [r for r in mine if r["cache"] == cache]
            if pts:
                ax.scatter([r["speedup_wall"] for r in pts], [r["agreement"] for r in pts], marker=marker,
                           color=colour, label=f"{family} ({cache or 'uncached'})")
                for r in pts:
                    ax.annotate(str(r["cache_refresh"] or "").replace("confidence:", "c"),
                                (r["speedup_wall"], r["agreement"]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
    ax.axhline(0.99, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("wall-clock speedup over uncached full steps")
    ax.set_ylabel("agreement with uncached full steps (discriminating tasks)")
    ax.set_title("charlm: approximate cache refresh policies")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _family(row: dict) -> str:
    if row["cache"] is None:
        return "full"
    refresh = row["cache_refresh"]
    return "plain" if refresh is None else "confidence" if isinstance(refresh, str) else "period"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=48, help="held-out prompts per short task (default: %(default)s)")
    p.add_argument("--n-chain", type=int, default=8, help="held-out prompts of chain (default: %(default)s)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, metavar="TASK")
    p.add_argument("--out", type=Path, default=Path("runs/cache-refresh"))
    args = p.parse_args()
    if args.n < 1 or args.n_chain < 1:
        p.error(f"--n and --n-chain must be positive, got {args.n} and {args.n_chain}")
    model, tok = load_text_model_or_embedded("charlm")
    rows = []
    with tqdm(total=len(args.tasks) * (1 + REPEATS * (1 + len(SETTINGS))), desc="cache refresh", unit="run") as bar:
        for task in args.tasks:
            bar.set_postfix_str(task)
            rows += run_task(model, tok, task, args.n_chain if task in LONG_TASKS else args.n, bar)
    rows += summarise(rows, args.tasks)
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(args.out, "cache-refresh", False, rows, n_per_task=args.n, n_chain=args.n_chain,
                  torch_threads=torch.get_num_threads())
    plot([r for r in rows if r["task"] == "discriminating"], args.out / "curve.png")
    columns = [("method", "method", ""), ("agreement", "agreement", ".3f"),
               ("min_task_agreement", "worst task", ".3f"), ("speedup_wall", "speedup wall", ".2f"),
               ("token_share", "tokens / full", ".3f")]
    print(markdown_table([r for r in rows if r["task"] == "discriminating"], columns))
    print(json.dumps({r["method"]: {r2["task"]: round(r2["agreement"], 3) for r2 in rows
                                    if r2["method"] == r["method"] and r2["task"] != "discriminating"}
                      for r in rows if r["task"] == "discriminating"}))


if __name__ == "__main__":
    main()
