"""The headline figures of ``diffexit bench text``: each row's wall speedup over the bidirectional model, issue #27's
goals and issue #31's halting and learned-commit goals, and the history (issue #29): one JSON line of headline figures per run in ``history.jsonl`` beside
``results.json``, and ``--compare``, the change of each row's figures against an earlier ``results.json``."""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch

from ...common.results import atomic_write_bytes, markdown_table

FIGURES = ("agreement", "speedup_nfe", "speedup_wall")
# What a history line keeps of each summary row: its identity (app/bench/rows.py) and headline figures.
SUMMARY_KEYS = ("model", "task", "method", "family", *FIGURES, "passes_over_oracle", "noisy")
SUMMARIES = ("discriminating", "controls")
# Results written before --models carry no model: they came from the default, the embedded bidirectional model.
LEGACY_MODEL = "charlm"


def compare_models(rows: list[dict]) -> None:
    """Sets ``speedup_wall_vs_bidirectional`` on every row: the first bidirectional model's full-steps time on the
    same task (or summary group) over the row's; None when the run has no bidirectional model."""
    bidirectional = next((r["model"] for r in rows if not r["block_causal"]), None)
    full = {r["task"]: r["seconds"] for r in rows if r["model"] == bidirectional and r["method"] == "full"}
    for r in rows:
        timed = r["task"] in full and r["seconds"] is not None  # the commit oracle is counted, never timed
        r["speedup_wall_vs_bidirectional"] = full[r["task"]] / r["seconds"] if timed else None


GOAL_AGREEMENT = 0.995
GOAL_WALL = {"discriminating": 8.0, "chain": 12.0}


def goals(rows: list[dict]) -> dict:
    """Issue #27's goals on the first block-causal model, met or not: a composed row (cache plus halting and/or
    parallel commits) keeping >= 99.5% of full steps' answers at >= 8x wall on the discriminating tasks and >= 12x
    on ``chain``; every cached full-steps row agreeing 100%. A goal whose task the run lacks is None. And issue
    #31's goal (1) under ``halting_vs_oracle`` (:func:`halting_goal`) and goal (2) under ``learned_vs_parallel``
    (:func:`learned_goal`)."""
    model = next((r["model"] for r in rows if r["block_causal"]), None)
    if model is None:
        return {"model": None, "halting_vs_oracle": halting_goal(rows), "learned_vs_parallel": learned_goal(rows)}
    mine = [r for r in rows if r["model"] == model]
    out = {"model": model, "agreement_at_least": GOAL_AGREEMENT}
    for task, wall in GOAL_WALL.items():
        kept = [r for r in mine if r["task"] == task and r["params"]["cache"] and not r["method"].startswith("full")
                and r["agreement"] >= GOAL_AGREEMENT]
        best = max(kept, key=lambda r: r["speedup_wall"], default=None)
        out[task] = None if not any(r["task"] == task for r in mine) else {
            "wall_at_least": wall, "met": best is not None and best["speedup_wall"] >= wall,
            "best": None if best is None else {k: best[k] for k in ("method", "agreement", "speedup_wall")}}
    cached_full = [r for r in mine if r["method"] == "full+prefix"]
    out["cached_full_agrees"] = all(r["agreement"] == 1.0 for r in cached_full) if cached_full else None
    out["halting_vs_oracle"] = halting_goal(rows)
    out["learned_vs_parallel"] = learned_goal(rows)
    return out


GOAL_ORACLE_SHARE = 1 / 1.15


def halting_goal(rows: list[dict]) -> Optional[dict]:
    """Issue #31's goal (1) on the first bidirectional model's ``discriminating`` rows, met or not: its best
    span-halting row without cache or parallel commits (a rule, not an oracle) that keeps >= 99.5% of full steps'
    answers reaches >= 1/1.15 of the halting oracle's NFE speedup (both the mean of the per-task speedups). None
    when the run has no such model, task group or oracle row."""
    model = next((r["model"] for r in rows if not r["block_causal"]), None)
    mine = [r for r in rows if r["model"] == model and r["task"] == "discriminating"]
    oracle = next((r for r in mine if r["method"] == "oracle-halt"), None)
    if oracle is None:
        return None
    # The learned rule in commit mode halts too, but it also commits early: a halting row commits only on schedule.
    kept = [r for r in mine if r["halts"] and not r["method"].startswith("oracle") and r["baseline"] == "full"
            and r["params"]["cache"] is None and r["params"]["parallel_threshold"] is None
            and r["params"].get("commit") != "commit" and r["agreement"] >= GOAL_AGREEMENT]
    best = max(kept, key=lambda r: r["speedup_nfe"], default=None)
    need = GOAL_ORACLE_SHARE * oracle["speedup_nfe"]
    return {"model": model, "oracle_speedup_nfe": oracle["speedup_nfe"], "speedup_nfe_at_least": need,
            "agreement_at_least": GOAL_AGREEMENT, "met": best is not None and best["speedup_nfe"] >= need,
            "best": None if best is None else {k: best[k] for k in ("method", "agreement", "speedup_nfe",
                                                                     "passes_over_oracle")}}


GOAL_LEARNED_RATIO = 1.5


def learned_goal(rows: list[dict]) -> dict:
    """Issue #31's goal (2) per model with learned rows, on its ``discriminating`` rows, met or not: its best
    ``learned-commit`` row (any cache) keeping >= 99.5% of full steps' answers reaches >= 1.5x the NFE speedup (the
    mean of the per-task speedups) of its best training-free parallel row (family ``parallel``: Fast-dLLM's
    threshold, any cache) at >= 99.5%. ``{model: goal}``; a model without both families' rows is left out."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model and r["task"] == "discriminating"]
        if not any(r["family"] == "learned-commit" for r in mine) or not any(r["family"] == "parallel" for r in mine):
            continue
        best = {family: max((r for r in mine if r["family"] == family and r["agreement"] >= GOAL_AGREEMENT),
                            key=lambda r: r["speedup_nfe"], default=None) for family in ("learned-commit", "parallel")}
        learned, parallel = best["learned-commit"], best["parallel"]
        # With no row of either family at the agreement there is no ratio, and the goal is not met.
        ratio = learned["speedup_nfe"] / parallel["speedup_nfe"] if learned and parallel else None
        out[model] = {"agreement_at_least": GOAL_AGREEMENT, "ratio_at_least": GOAL_LEARNED_RATIO, "ratio": ratio,
                      "met": ratio is not None and ratio >= GOAL_LEARNED_RATIO,
                      **{k: None if r is None else {f: r[f] for f in ("method", "agreement", "speedup_nfe")}
                         for k, r in (("learned", learned), ("parallel", parallel))}}
    return out


def goal_lines(goal: dict) -> list[str]:
    """The goals block as printed lines, met or not, with the best row's figures."""
    lines = []
    for task in GOAL_WALL:
        g = goal.get(task)
        if g:
            best = g["best"]
            lines.append(f"goal {goal['model']} {task}: >= {g['wall_at_least']:g}x wall at >= "
                         f"{100 * GOAL_AGREEMENT:g}% same as full: {'met' if g['met'] else 'not met'}"
                         + (f" (best {best['method']}: {best['speedup_wall']:.2f}x, {100 * best['agreement']:.1f}%)"
                            if best else ""))
    h = goal.get("halting_vs_oracle")
    if h:
        best = h["best"]
        lines.append(f"goal {h['model']} discriminating: a halting row (no cache, no parallel commits) at >= "
                     f"{100 * GOAL_AGREEMENT:g}% same as full reaches >= 1/1.15 of the halting oracle's "
                     f"{h['oracle_speedup_nfe']:.2f}x NFE speedup ({h['speedup_nfe_at_least']:.2f}x): "
                     f"{'met' if h['met'] else 'not met'}" + (
                         f" (best {best['method']}: {best['speedup_nfe']:.2f}x, {100 * best['agreement']:.1f}%, "
                         f"{best['passes_over_oracle']:.2f}x the oracle's passes)" if best else ""))
    for model, g in (goal.get("learned_vs_parallel") or {}).items():
        shown = [f"{r['method']} {r['speedup_nfe']:.2f}x at {100 * r['agreement']:.1f}%" if r else
                 f"no {k} row at the agreement" for k, r in (("learned-commit", g["learned"]),
                                                            ("parallel", g["parallel"]))]
        lines.append(f"goal {model} discriminating: the best learned-commit row at >= {100 * GOAL_AGREEMENT:g}% same "
                     f"as full reaches >= {g['ratio_at_least']:g}x the NFE speedup of the best parallel row: "
                     f"{'met' if g['met'] else 'not met'} ({'; '.join(shown)}"
                     + (f"; ratio {g['ratio']:.2f}" if g["ratio"] is not None else "") + ")")
    return lines


def _commit() -> Optional[str]:
    """The checked-out commit of the repository this file is in, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def history_line(rows: list[dict], goals: dict, quick: bool, n: int) -> dict:
    """The history line of one run: where and when it ran, the goal block, and each model's summary rows."""
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(), "machine": platform.machine(), "platform": platform.platform(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "quick": quick, "n_per_task": n,
        "goals": goals,
        "summaries": [{k: r[k] for k in SUMMARY_KEYS} for r in rows if r["task"] in SUMMARIES],
    }


def append_history(results_path: Path, line: dict) -> Path:
    """Appends ``line`` to ``history.jsonl`` beside ``results_path``, rewriting the whole file atomically so a crash
    never leaves half a line."""
    path = Path(results_path).parent / "history.jsonl"
    old = path.read_bytes() if path.is_file() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    atomic_write_bytes(path, old + json.dumps(line).encode() + b"\n")
    return path


def load_earlier(path: Path) -> dict:
    """``{(model, task, method): row}`` of an earlier bench text ``results.json``; a ``ValueError`` naming the
    problem when the file is missing or is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--compare {path}: no such file; pass a results.json an earlier `diffexit bench text` "
                         f"wrote") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--compare {path}: not a readable JSON file ({e}); pass a bench text results.json") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not (isinstance(data, dict) and data.get("benchmark") == "text" and isinstance(rows, list)):
        raise ValueError(f"--compare {path}: not a bench text results file (it needs \"benchmark\": \"text\" and a "
                         f"list of rows); pass a results.json `diffexit bench text` wrote")
    out = {}
    for i, r in enumerate(rows):
        if not (isinstance(r, dict) and isinstance(r.get("task"), str) and isinstance(r.get("method"), str)
                and all(r.get(k) is None or isinstance(r.get(k), (int, float)) for k in FIGURES)):
            raise ValueError(f"--compare {path}: row {i} lacks a task, a method or numeric {', '.join(FIGURES)}; "
                             f"pass a results.json `diffexit bench text` wrote")
        out[(r.get("model", LEGACY_MODEL), r["task"], r["method"])] = r
    return out


def _delta(now, before):
    return None if now is None or before is None else now - before


def compare(rows: list[dict], earlier: dict) -> str:
    """A markdown table of the change of agreement, NFE ratio and wall speedup against ``earlier``: every summary
    row both runs have, and every per-task row whose agreement or NFE ratio changed (wall-clock always moves a
    little, so it alone does not list a per-task row)."""
    out = []
    for r in rows:
        before = earlier.get((r["model"], r["task"], r["method"]))
        if before is None:
            continue
        delta = {f"d_{k}": _delta(r[k], before.get(k)) for k in FIGURES}
        moved = any(delta[f"d_{k}"] for k in ("agreement", "speedup_nfe"))
        if r["task"] in SUMMARIES or moved:
            out.append({k: r[k] for k in ("model", "task", "method", *FIGURES)} | delta)
    columns = [("model", "model", ""), ("task", "task", ""), ("method", "method", ""),
               ("agreement", "same as full", ".3f"), ("d_agreement", "change", "+.3f"),
               ("speedup_nfe", "speedup NFE", ".2f"), ("d_speedup_nfe", "change", "+.2f"),
               ("speedup_wall", "speedup wall", ".2f"), ("d_speedup_wall", "change", "+.2f")]
    return markdown_table(out, columns)
