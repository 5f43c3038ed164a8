"""Benchmark reporting shared by ``diffexit bench ...``: the results.json layout, markdown tables, atomic writes."""

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
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
