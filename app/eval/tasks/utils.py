"""The documents and the scoring of the shipped ``diffexit_*`` lm-eval tasks.

Each task's documents are ``data/<task>.jsonl``: 200 held-out prompts of the embedded task, draw 0
(``diffexit.dllm.charlm.tasks.sample(task, "heldout", 0, 200)``; a test checks the files still equal it), so the
tasks need no network. ``exact_match`` is an exact match against the set of right answers: the choosing tasks
(``pick``, ``zip``, ``trio``, ``chain``) have several, so the task's own checker scores it, without stripping.

``diffexit_reverse_choice`` is multiple choice over the reverse documents (:func:`reverse_choices`), for
log-likelihood scoring.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def load_docs(task: str, **metadata):
    """lm-eval's ``custom_dataset``: the task's documents as a ``DatasetDict`` with one ``test`` split."""
    import datasets

    rows = [json.loads(line) for line in (DATA / f"{task}.jsonl").read_text(encoding="utf-8").splitlines() if line]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_results(doc: dict, results: list) -> dict:
    from diffexit.dllm.charlm.tasks import score

    return {"exact_match": float(score(doc["task"], doc["prompt"], results[0]))}


def reverse_choices(doc: dict) -> list[str]:
    """The reversal and three near misses of the same letters, sorted (so the right one's place varies): the word
    as given, and the reversal with its first two, or its last two, letters swapped; duplicates dropped."""
    answer = doc["answer"]
    near = [answer[::-1], answer[1] + answer[0] + answer[2:], answer[:-2] + answer[-1] + answer[-2]]
    return sorted({answer, *near})


def reverse_gold(doc: dict) -> int:
    return reverse_choices(doc).index(doc["answer"])
