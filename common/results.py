"""Writing results: atomic file writes (a reader or a crash never sees half a file), ``results.json``, markdown tables.

Everything diffexit writes for a user goes through :func:`atomic_write_bytes`: benchmark results, calibrations, model
cards, batch outputs. Files get the mode a plain ``open(path, "w")`` would give them (``0666`` less the umask).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so a reader (or a
    crash) never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; give it what open() would, so other users of the folder can read it.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process's umask. Linux shows it in /proc; elsewhere it can only be read by setting it, so it is set
    straight back (a file another thread creates in between gets umask 022)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_results(out_dir: Path, benchmark: str, quick: bool, rows: list[dict], **extra: Any) -> Path:
    """``out_dir/results.json`` as ``{"benchmark", "quick", "rows", **extra}``; NaN and inf become null."""
    payload = {"benchmark": benchmark, "quick": quick, "rows": rows, **extra}
    text = json.dumps(_finite(payload), indent=2)
    path = Path(out_dir) / "results.json"
    atomic_write_bytes(path, text.encode())
    return path


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def markdown_table(rows: Iterable[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """Rows as a markdown table. ``columns``: ``(key, header, format spec)``; None shows as ``-``."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _, spec in columns:
            value = row.get(key)
            if value is None or (isinstance(value, float) and not math.isfinite(value)):
                cells.append("-")
            elif spec:
                cells.append(format(value, spec))
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
