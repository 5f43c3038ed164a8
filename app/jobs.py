"""Resumable, distributed batch jobs: the machinery under ``diffexit generate images|text``.

A job is a list of items (each with an id, and a seed fixed by that id), cut into batches in a fixed order, an
engine that turns one batch into a record per item (plus the files each item writes), and an output folder::

    OUT/job.json                 what the job is (settings, items, batch size); a rerun must match it
    OUT/<each item's files>      e.g. <id>.png, each written whole (temp file in OUT, then a rename)
    OUT/.parts/<batch>.jsonl     one batch's records, written after its files: the mark that the batch is done
    OUT/<manifest>.jsonl         every record in item order, merged by the main process at the end

**Process count.** Batches are cut before they are dealt out, so a batch holds the same items whatever the number
of processes, and each item's seed depends on its id alone; outputs therefore do not depend on how many processes
ran them. The pending batches are dealt round-robin: batch ``k`` of the pending list goes to process
``k % num_processes``. Under ``accelerate launch`` or ``torchrun`` every process runs the same command; OUT must
be a folder all of them see.

**Killed at any moment.** A batch is done when its part file exists and so do all of its items' files. Files only
ever appear whole (rename), and the part file goes last, so a kill (SIGKILL included) leaves whole files and, at
worst, batches without their mark. A rerun runs those batches again with the same items and seeds, writes the files
that are missing and the mark, and leaves the files that exist alone. Temp files a kill left behind are removed by
the main process before any work starts; the manifest is rewritten, whole, from the part files at the end.

**One job per folder.** A job holds ``OUT/.job.lock`` (``flock``, taken by the main process) from before its
model loads until it ends; a second job on the same folder is refused at once, naming the holder. The OS drops the
lock when its holder dies, so a killed job never blocks the rerun that resumes it. Only the holder removes temp
files, so it never deletes another job's file mid-write.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence

from ..common.results import atomic_write_bytes
from .job_inputs import Batch, Item, Job, JobError, deal

JOB_FILE = "job.json"
PARTS_DIR = ".parts"
LOCK_FILE = ".job.lock"


# The output folder -------------------------------------------------------------------------------------------------

def prepare_out_dir(out: Path) -> Path:
    """Create ``out`` if needed and check that files can be written there; touches no existing file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise JobError(f"output folder {out} exists and is not a folder; pass --out a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        # Named like atomic_write_bytes' temp files, so a kill right here leaves nothing the next run won't remove.
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-probe.", suffix=".tmp")
        os.close(fd)
        # The lock holder of a job already running here may have removed it as a stale temp file.
        Path(probe).unlink(missing_ok=True)
    except OSError as e:
        raise JobError(f"cannot write to output folder {out}: {e.strerror or e}; pass --out a writable folder") from e
    return out


# The folder's lock: a kernel-held flock, so it dies with its holder and leaves no stale state to clear.
_HELD: dict[Path, Optional[int]] = {}  # folder -> its lock file's descriptor (None on the other processes)


def _try_lock(out: Path) -> int:
    """A descriptor of ``out/LOCK_FILE`` holding its flock; :class:`JobError` naming the holder if a job has it."""
    path = out / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise JobError(f"cannot create the lock file {path}: {e.strerror or e}; pass --out a writable folder") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "a job that is starting"
            os.close(fd)
            if isinstance(e, BlockingIOError):
                raise JobError(f"output folder {out} is in use by another diffexit job ({holder}); wait for it to "
                               f"end and rerun to resume, or pass another --out") from None
            raise JobError(f"cannot lock output folder {out}: {e.strerror or e}; pass --out a folder on a disk "
                           f"that supports file locks") from e
        # A holder unlinks the file before it unlocks, so a lock won on an unlinked file is no lock: retry.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}".encode())
                return fd
        os.close(fd)


@contextlib.contextmanager
def lock_out_dir(out: Path, state):
    """Hold ``out``'s job lock for the block (a no-op inside a block that holds it already). Every process of the
    job enters together (``state``: :func:`process_state`'s): the main process takes the lock and tells the others
    whether it did, so all raise the same :class:`JobError` when another job holds the folder."""
    out = Path(out).resolve()
    if out in _HELD:
        yield
        return
    fd, error = None, [None]
    if state.is_main_process:
        try:
            fd = _try_lock(out)
        except JobError as e:
            error[0] = str(e)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(error)
    if error[0] is not None:
        raise JobError(error[0])
    _HELD[out] = fd
    try:
        yield
    finally:
        del _HELD[out]
        if fd is not None:
            (out / LOCK_FILE).unlink(missing_ok=True)  # while still locked: see _try_lock
            os.close(fd)


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def job_spec(settings: dict, job: Job) -> dict:
    """``settings`` (everything that shapes the outputs: model, method, steps...) plus digests of the items and of
    how they are batched; this is what ``job.json`` holds and what a rerun must match."""
    items = hashlib.sha256()
    for item in job.items:
        items.update((_canonical([item.id, item.seed, item.payload]) + "\n").encode())
    batches = hashlib.sha256(_canonical([[item.id for item in b.items] for b in job.batches]).encode())
    return json.loads(_canonical({**settings, "items": len(job.items), "items_sha256": items.hexdigest(),
                                  "batches_sha256": batches.hexdigest()}))


def check_job(out: Path, spec: dict) -> None:
    """Refuse to resume into ``out`` if it holds a different job (different settings, items or batch size)."""
    path = Path(out) / JOB_FILE
    if not path.exists():
        return
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JobError(f"{path} is unreadable ({e}); it is not a diffexit job folder, pass another --out") from e
    if existing != spec:
        keys = sorted(k for k in set(existing) | set(spec) if existing.get(k) != spec.get(k))
        detail = "; ".join(f"{k}: {existing.get(k)!r} there, {spec.get(k)!r} now" for k in keys[:4])
        raise JobError(f"{out} holds the outputs of a different job ({detail}); rerun with the same inputs and "
                       f"settings to resume it, or pass another --out")


# Running ------------------------------------------------------------------------------------------------------------

class Engine(Protocol):
    """What a job runs. ``files(item)``: the file names the item writes in OUT (none for text). ``run(items)``: one
    ``(record, {file name: bytes})`` per item, in order; the record is JSON-serialisable and starts with ``id``."""

    def files(self, item: Item) -> list[str]: ...

    def run(self, items: Sequence[Item]) -> list[tuple[dict, dict[str, bytes]]]: ...


@dataclass
class JobResult:
    """What one run of a job did.

    Attributes:
        items: items in the job.
        generated: items this run produced (the rest were complete already).
        seconds: wall-clock seconds of this run's work, from the first batch to the merged manifest.
        processes: processes that shared the work.
        records: every item's record in item order (main process only; None elsewhere).
        manifest: the merged manifest's path.
    """

    items: int
    generated: int
    seconds: float
    processes: int
    records: Optional[list[dict]]
    manifest: Path

    @property
    def throughput(self) -> Optional[float]:
        """Items per second of wall clock over all processes, or None if nothing ran."""
        return self.generated / self.seconds if self.generated and self.seconds > 0 else None


def process_state():
    """accelerate's ``PartialState``: this process's index, the process count, its device, and barriers.

    accelerate only sets up its CPU (gloo) process group when told the run is on CPU. ``accelerate launch --cpu``
    says so through ``ACCELERATE_USE_CPU``; torchrun, and ``accelerate launch --multi_gpu`` on a machine with no
    accelerator, do not, so a machine without one is told here. Processes other than the main one also turn off
    diffusers' and transformers' progress bars (model loading), so that only one process draws any.
    """
    import diffusers
    import torch
    import transformers
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not has_accelerator)
    if not state.is_main_process:
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    return state


def _part_path(out: Path, batch: Batch) -> Path:
    return out / PARTS_DIR / f"{batch.index:06d}.jsonl"


def _read_part(path: Path) -> Optional[list[dict]]:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    except (OSError, ValueError):
        return None


def batch_done(out: Path, batch: Batch, engine: Engine) -> bool:
    """Whether ``batch`` is complete in ``out``: its part file lists exactly its items, and all their files exist."""
    records = _read_part(_part_path(out, batch))
    if records is None or [r.get("id") for r in records] != [item.id for item in batch.items]:
        return False
    return all((out / name).is_file() for item in batch.items for name in engine.files(item))


def _remove_stale_temp_files(out: Path) -> None:
    # atomic_write_bytes writes `.{name}.XXXX.tmp` beside the target; a kill between write and rename leaves one.
    # Called under the folder's lock, so no other job is writing one.
    for folder in (out, out / PARTS_DIR):
        if folder.is_dir():
            for path in folder.glob(".*.tmp"):
                path.unlink(missing_ok=True)


def run_job(out: Path, spec: dict, job: Job, engine: Engine, *, manifest: str, desc: str, state=None) -> JobResult:
    """Run every batch of ``job`` not yet done in ``out``, spread over the processes, then merge the manifest.

    Every process calls this with the same arguments. ``spec`` is :func:`job_spec`'s (it becomes ``job.json``; a
    folder holding another job is refused). ``manifest`` is the merged JSONL's file name. The main process draws the
    progress bar and merges. The run holds the folder's lock (:func:`lock_out_dir`); a command takes it earlier,
    before it loads a model, so a folder in use is refused before that work.
    """
    state = state or process_state()
    with lock_out_dir(out, state):
        return _run_locked(Path(out), spec, job, engine, manifest, desc, state)


def _run_locked(out: Path, spec: dict, job: Job, engine: Engine, manifest: str, desc: str, state) -> JobResult:
    from tqdm.auto import tqdm

    check_job(out, spec)
    if state.is_main_process:
        if not (out / JOB_FILE).exists():
            try:
                # Strict JSON: Infinity/NaN tokens would make job.json unreadable to other JSON readers.
                text = json.dumps(spec, indent=2, sort_keys=True, allow_nan=False)
            except ValueError as e:
                raise JobError(f"the job's settings hold a non-finite number ({e}); give finite values") from e
            atomic_write_bytes(out / JOB_FILE, (text + "\n").encode())
        (out / PARTS_DIR).mkdir(exist_ok=True)
        _remove_stale_temp_files(out)
    state.wait_for_everyone()
    pending = [b for b in job.batches if not batch_done(out, b, engine)]
    # Nobody writes before everyone has listed what is pending, so all processes deal the same list.
    state.wait_for_everyone()
    start = time.perf_counter()
    total = sum(len(b.items) for b in pending)
    with tqdm(total=total, desc=desc, unit="item", disable=not state.is_main_process or total == 0) as bar:
        for batch in deal(pending, state.process_index, state.num_processes):
            _run_batch(out, batch, engine)
            if state.is_main_process:
                # Count every process's finished batches, so the bar shows the whole job's progress.
                bar.update(sum(len(b.items) for b in pending if _part_path(out, b).exists()) - bar.n)
        state.wait_for_everyone()
        bar.update(total - bar.n)
    records = None
    if state.is_main_process:
        records = merge(out, job, manifest)
    state.wait_for_everyone()
    return JobResult(items=len(job.items), generated=total,
                     seconds=time.perf_counter() - start, processes=state.num_processes, records=records,
                     manifest=out / manifest)


def _run_batch(out: Path, batch: Batch, engine: Engine) -> None:
    start = time.perf_counter()
    results = engine.run(batch.items)
    seconds = (time.perf_counter() - start) / len(batch.items)
    if [r["id"] for r, _ in results] != [item.id for item in batch.items]:
        raise RuntimeError(f"the engine returned records for {[r['id'] for r, _ in results]}, "
                           f"expected {[item.id for item in batch.items]}")
    lines = []
    for record, files in results:
        for name, data in files.items():
            if not (out / name).is_file():
                atomic_write_bytes(out / name, data)
        lines.append(json.dumps({**record, "seconds": seconds}) + "\n")
    atomic_write_bytes(_part_path(out, batch), "".join(lines).encode())


def merge(out: Path, job: Job, manifest: str) -> list[dict]:
    """Every batch's records, in item order, written atomically to ``out/manifest``; returns them."""
    position = {item.id: i for i, item in enumerate(job.items)}
    records = []
    for batch in job.batches:
        part = _read_part(_part_path(out, batch))
        if part is None or [r.get("id") for r in part] != [item.id for item in batch.items]:
            raise RuntimeError(f"batch {batch.index} has no complete part file in {out / PARTS_DIR} after the run")
        records += part
    records.sort(key=lambda r: position[r["id"]])
    atomic_write_bytes(Path(out) / manifest, "".join(json.dumps(r) + "\n" for r in records).encode())
    return records


# Reporting ----------------------------------------------------------------------------------------------------------

def describe_run(result: JobResult, what: str) -> str:
    """One line: how many items this run made, how fast, on how many processes."""
    if result.generated == 0:
        return f"{what}: all {result.items} items were already complete in {result.manifest.parent}; nothing to do"
    skipped = result.items - result.generated
    return (f"{what}: {result.generated} items ({skipped} already complete) in {result.seconds:.2f} s on "
            f"{result.processes} process{'es' if result.processes > 1 else ''}: {result.throughput:.2f} items/s; "
            f"manifest {result.manifest}")


def wall_speedup(full_records: Sequence[dict], records: Sequence[dict]) -> float:
    """Full-method seconds over method seconds, summed over the same items (from the manifests' ``seconds``)."""
    return sum(r["seconds"] for r in full_records) / max(sum(r["seconds"] for r in records), 1e-12)
