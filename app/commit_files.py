"""What both commit trainers (``diffexit train commit`` for the masked models, :mod:`diffexit.app.train_commit`, and
for DiffusionGemma, :mod:`diffexit.app.train_commit_gemma`) record and write: the data block of a commit model's
record, and the model file with its card beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..common.results import atomic_write_bytes
from ..dllm.commit_rule import CommitModel


def data_record(args, n_for: Callable[[str, int], int]) -> dict:
    """Where the training, calibration and validation prompts came from and how many of each task
    (``n_for(task, n)``, a task's share of ``n``), for the record and the card."""
    return {"train": f"train split, draw {args.seed}", "calibration": "held-out draw 1",
            "validation": "held-out draw 2", "tasks": args.tasks,
            "prompts_per_task": {t: {"train": n_for(t, args.n_train), "calibration": n_for(t, args.n_cal),
                                     "validation": n_for(t, args.n_val)} for t in args.tasks}}


def write_commit_model(commit_model: CommitModel, out: Path, card: str, fit_figures: dict, validation: dict) -> int:
    """Write ``commit_model`` to ``out`` and ``card`` to ``COMMIT_CARD.md`` beside it (each atomically), print the
    headline figures; returns the command's exit code, 0."""
    commit_model.save(out)
    card_path = out.with_name("COMMIT_CARD.md")
    atomic_write_bytes(card_path, card.encode())
    print(json.dumps({"thresholds": commit_model.thresholds, "fit": fit_figures, "validation": validation},
                     indent=1))
    print(f"wrote {out} and {card_path}")
    return 0
