"""Reading what a batch job is asked to do: JSONL request files and JSON config files, line by line.

Every problem raises :class:`~diffexit.app.jobs.JobError` naming the file, the line and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .jobs import JobError


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of a JSONL file; a bad line raises, naming its number."""
    path = Path(path)
    if not path.is_file():
        raise JobError(f"input file {path} does not exist" if not path.exists() else f"input {path} is not a file")
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f"cannot read {path}: {e}") from e
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise JobError(f"{path} line {number}: not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(row, dict):
            raise JobError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    if not rows:
        raise JobError(f"{path} has no lines; give one JSON object per line")
    return rows


def check_keys(row: dict, allowed: Sequence[str], where: str) -> None:
    unknown = sorted(set(row) - set(allowed))
    if unknown:
        raise JobError(f"{where}: unknown key(s) {unknown}; allowed: {list(allowed)}")


def read_config(path: Path) -> dict:
    """A method config file: one JSON object."""
    path = Path(path)
    if not path.is_file():
        raise JobError(f"config file {path} does not exist" if not path.exists() else f"config {path} is not a file")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f"cannot read config file {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise JobError(f"config file {path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    if not isinstance(config, dict):
        raise JobError(f"config file {path} must hold one JSON object, got {type(config).__name__}")
    return config
