"""``diffexit eval``: lm-evaluation-harness's own command line, with the ``diffexit`` model and the shipped tasks.

    diffexit eval --tasks diffexit_pick --limit 40 \\
        --model_args model=charlm,method=sched,schedule=cosine:7.5:2.5,stat=quantile --log_samples --output_path DIR
    accelerate launch --cpu --num_processes 2 -m diffexit.app.cli eval --tasks diffexit_zip ...

Every ``lm-eval run`` flag works. ``--model`` defaults to ``diffexit`` (:mod:`diffexit.app.eval.lm`: the model and
its decoding spec by ``generate text``'s names in ``--model_args``), and the shipped offline tasks
(``diffexit_reverse`` ... ``diffexit_chain``, tag ``diffexit``; :mod:`diffexit.app.eval.tasks`) are on the task
path beside any ``--include_path``. With ``--log_samples``, each logged sample of the diffexit model also gets
``diffexit``: one ``{"nfe", "seconds"}`` per request of its document (forward passes; its batch's seconds over the
batch's size). At the end the command prints the requests' mean forward passes and seconds.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def _run_argv(argv: Sequence[str]) -> list[str]:
    """lm-eval's ``run`` arguments, with ``--model diffexit`` unless the user names a model."""
    argv = list(argv)
    if argv and argv[0] == "run":
        argv = argv[1:]
    if not any(a in ("--model", "-M") or a.startswith("--model=") for a in argv):
        argv = ["--model", "diffexit", *argv]
    return ["run", *argv]


def main(argv: Sequence[str], prog: str = "diffexit eval") -> int:
    try:
        from lm_eval._cli import HarnessCLI
        from lm_eval.utils import setup_logging
    except ImportError:
        print(f"{prog}: error: lm-eval is not installed: pip install 'diffexit[eval]'", file=sys.stderr)
        return 2
    from . import lm

    # Nothing here is downloaded: the shipped tasks read their own files, and a hub dataset fails at once.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    setup_logging()
    cli = HarnessCLI()
    saved, sys.argv = sys.argv, [prog, *_run_argv(argv)]
    try:
        args = cli.parse_args()  # lm-eval's parser reads sys.argv
    finally:
        sys.argv = saved
    if getattr(args, "command", None) == "run":
        # lm-eval's flag takes one folder; its task manager takes several.
        args.include_path = [str(TASKS_DIR)] + ([args.include_path] if args.include_path else [])
        if args.model == "diffexit" and isinstance(args.model_args or {}, dict):
            # lm-eval names the output folder after model_args' model= and makes up a random name without one.
            args.model_args = {"model": "charlm", **(args.model_args or {})}
        if args.device is None:
            # lm-eval would default to cuda:0; generate text runs on accelerate's device for this process.
            from ..jobs import process_state

            args.device = str(process_state().device)
    lm.DiffexitLM.instances.clear()
    try:
        cli.execute(args)
    except (lm.LoglikelihoodUnsupported, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    models = list(lm.DiffexitLM.instances)
    if models:
        records = _gathered([r for m in models for r in m.records], models[0])
        if records is not None:
            if getattr(args, "log_samples", False) and args.output_path:
                _annotate_samples(Path(args.output_path), records)
            _summary(records, prog)
    return 0


def _gathered(records: list[dict], model):
    """Every process's request records on the main process (None on the others), each request once: lm-eval pads
    a process that has fewer requests with copies of one of its own, which are decoded but not scored."""
    parts = [records] if model.world_size == 1 else model.gather_object(records, dst=0)
    if parts is None:
        return None
    unique: dict = {}
    for r in (r for part in parts for r in part):
        unique.setdefault((r["task"], r["doc_id"], r["idx"]), r)
    return list(unique.values())


def _annotate_samples(output_path: Path, records: list[dict]) -> None:
    """Add ``diffexit: [{nfe, seconds}, ...]`` to each logged sample of the tasks these records decoded, in the
    newest samples file of each task under ``output_path`` (lm-eval's ``samples_<task>_<time>.jsonl``)."""
    from ...common.results import atomic_write_bytes

    by_doc: dict = {}
    for r in sorted(records, key=lambda r: r["idx"]):
        by_doc.setdefault((r["task"], r["doc_id"]), []).append({"nfe": r["nfe"], "seconds": r["seconds"]})
    for task in sorted({task for task, _ in by_doc}):
        files = sorted(output_path.rglob(f"samples_{task}_*.jsonl"), key=lambda p: p.stat().st_mtime)
        # A task whose name extends this one's (diffexit_zip, diffexit_zip_long) has its own files.
        files = [f for f in files if f.name[len(f"samples_{task}_"):][:1].isdigit()]
        if not files:
            continue
        lines = []
        for line in files[-1].read_text(encoding="utf-8").splitlines():
            sample = json.loads(line)
            sample["diffexit"] = by_doc.get((task, sample["doc_id"]), [])
            lines.append(json.dumps(sample, ensure_ascii=False))
        atomic_write_bytes(files[-1], ("\n".join(lines) + "\n").encode("utf-8"))


def _summary(records: list[dict], prog: str) -> None:
    n = len(records)
    if n:
        nfe = sum(r["nfe"] for r in records) / n
        seconds = sum(r["seconds"] for r in records) / n
        print(f"{prog}: {n} requests, {nfe:.2f} forward passes and {seconds * 1000:.1f} ms each on average")
