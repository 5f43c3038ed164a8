"""The bench text history (issue #29): one JSON line of headline figures per run in ``history.jsonl`` beside
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
