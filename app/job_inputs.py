"""What a batch job is asked to do: its items (ids, seeds), the batches they are cut into, and the JSONL request
files and JSON config files they are read from, line by line.

Every problem raises :class:`JobError` naming the file, the line and the fix.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Optional, Sequence

ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
MAX_ID_LENGTH = 128


class JobError(ValueError):
    """Bad input to a job (a file, a flag, a model, the output folder): the message names it and the fix."""


# Items and batches ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One unit of output.

    Attributes:
        id: unique within the job; where it names files (images), :func:`check_item_id` restricts its characters.
        seed: the item's random seed (see :func:`item_seed`), or None where nothing is random (greedy decoding).
        payload: what the engine needs (a class label, a prompt...); JSON-serialisable.
        source: where the item came from, for error messages (e.g. ``"requests.jsonl line 3"``).
    """

    id: str
    seed: Optional[int]
    payload: dict
    source: str = field(default="", compare=False)


@dataclass(frozen=True)
class Batch:
    """Items run together. ``index`` names the batch's part file; it is fixed by the job, not by the process."""

    index: int
    items: tuple[Item, ...]


def item_seed(item_id: str, base_seed: int = 0) -> int:
    """A seed in ``[0, 2**32)`` that depends only on ``base_seed`` and the item's id (not on order or count)."""
    digest = hashlib.sha256(f"{base_seed}/{item_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def check_item_id(item_id, where: str) -> str:
    """Return ``item_id`` if it can name a file; raise :class:`JobError` naming ``where`` otherwise."""
    if not isinstance(item_id, str) or not ID_PATTERN.fullmatch(item_id) or len(item_id) > MAX_ID_LENGTH:
        raise JobError(f"{where}: id {item_id!r} cannot name a file; use up to {MAX_ID_LENGTH} letters, digits, "
                       f"'_', '.' or '-', not starting with '.' or '-'")
    return item_id


def check_unique(items: Sequence[Item]) -> None:
    seen: dict[str, Item] = {}
    for item in items:
        if item.id in seen:
            first = seen[item.id].source or "another item"
            raise JobError(f"{item.source or 'input'}: id {item.id!r} is already used by {first}; ids must be unique")
        seen[item.id] = item
    if not items:
        raise JobError("the job has no items; give at least one")


@dataclass(frozen=True)
class Job:
    """The items, in order, and the batches they are cut into."""

    items: tuple[Item, ...]
    batches: tuple[Batch, ...]


def make_job(items: Sequence[Item], batch_size: int, group: Optional[Callable[[Item], Hashable]] = None) -> Job:
    """Cut ``items`` into batches of at most ``batch_size``, in item order.

    With ``group``, items of different groups never share a batch (e.g. text prompts with different layouts):
    groups come in order of first appearance, each cut in item order.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise JobError(f"the batch size must be a positive int, got {batch_size!r}")
    check_unique(items)
    groups: dict[Hashable, list[Item]] = {}
    for item in items:
        groups.setdefault(group(item) if group else None, []).append(item)
    batches = []
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            batches.append(Batch(len(batches), tuple(members[start:start + batch_size])))
    return Job(tuple(items), tuple(batches))


def deal(pending: Sequence[Batch], process_index: int, num_processes: int) -> list[Batch]:
    """The batches of ``pending`` that process ``process_index`` of ``num_processes`` runs: every
    ``num_processes``-th, starting at its own index."""
    return list(pending[process_index::num_processes])


# Input files --------------------------------------------------------------------------------------------------------


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
