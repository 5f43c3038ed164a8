"""The headline figures of ``diffexit bench text``: each row's wall speedup over the bidirectional model, issue #27's
goals, and the history (issue #29): one JSON line of headline figures per run in ``history.jsonl`` beside
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
SUMMARIES = ("discriminating", "controls")
# Results written before --models carry no model: they came from the default, the embedded bidirectional model.
LEGACY_MODEL = "charlm"


def compare_models(rows: list[dict]) -> None:
    """Sets ``speedup_wall_vs_bidirectional`` on every row: the first bidirectional model's full-steps time on the
    same task (or summary group) over the row's; None when the run has no bidirectional model."""
    bidirectional = next((r["model"] for r in rows if not r["block_causal"]), None)
    full = {r["task"]: r["seconds"] for r in rows if r["model"] == bidirectional and r["method"] == "full"}
    for r in rows:
        r["speedup_wall_vs_bidirectional"] = full[r["task"]] / r["seconds"] if r["task"] in full else None


GOAL_AGREEMENT = 0.995
GOAL_WALL = {"discriminating": 8.0, "chain": 12.0}


def goals(rows: list[dict]) -> dict:
    """Issue #27's goals on the first block-causal model, met or not: a composed row (cache plus halting and/or
    parallel commits) keeping >= 99.5% of full steps' answers at >= 8x wall on the discriminating tasks and >= 12x
    on ``chain``; every cached full-steps row agreeing 100%. A goal whose task the run lacks is None."""
    model = next((r["model"] for r in rows if r["block_causal"]), None)
    if model is None:
        return {"model": None}
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
    return out



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
        "summaries": [{k: r[k] for k in ("model", "task", "method", *FIGURES)} for r in rows if r["task"] in SUMMARIES],
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
