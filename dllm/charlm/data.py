"""The training data of the embedded text models: each step's examples, by task and layout.

Every step trains on one batch per layout, so that short examples never pay for long padding: the short tasks
(``batch_short`` examples) and the long-form ``chain`` (``batch_long``). ``TASK_SHARES`` sets each task's part:
within a batch its share of the examples, and across layouts its share of the loss (each group's mean loss is
weighted by its tasks' total share). The data of step ``s`` is a function of ``(seed, s, process index)`` alone, so
a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import torch

from .tasks import TASK_NAMES, TASKS, Example, Layout, sample
from .tokenizer import encode_answers, encode_prompts

# Relative weight of each task in the data and the loss: the discriminating tasks and the carries of `add` need
# the most examples to learn; `reverse` is learned first.
TASK_SHARES = {"reverse": 2, "add": 4, "pick": 3, "zip": 3, "trio": 3, "chain": 4}
SHORT_TASKS = tuple(t for t in TASK_NAMES if TASKS[t].layout == "short")
LONG_TASKS = tuple(t for t in TASK_NAMES if TASKS[t].layout == "long")


def encode_examples(tokenizer, examples: list[Example], layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt (left-padded) + answer + EOS padding: ``(input_ids, attention_mask)``, int64 ``[B, layout.seq_length]``."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [e.prompt for e in examples], layout.prompt_length)
    span = encode_answers(tokenizer, [e.answer for e in examples], layout.span_length)
    return torch.cat([prompt_ids, span], 1), torch.cat([prompt_mask, torch.ones_like(span)], 1)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of step ``step``'s data on process ``rank``."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def split_counts(total: int, tasks: tuple[str, ...]) -> dict[str, int]:
    """``total`` examples split over ``tasks`` in proportion to ``TASK_SHARES`` (largest remainders round up)."""
    shares = sum(TASK_SHARES[t] for t in tasks)
    exact = {t: total * TASK_SHARES[t] / shares for t in tasks}
    counts = {t: int(exact[t]) for t in tasks}
    for t in sorted(tasks, key=lambda t: counts[t] - exact[t])[: total - sum(counts.values())]:
        counts[t] += 1
    return counts


def step_examples(step: int, seed: int, rank: int, batch_short: int, batch_long: int) -> dict[str, list[Example]]:
    """The training examples of ``step`` on process ``rank``, per layout (``"short"``, and ``"long"`` if any)."""
    data_seed = step_seed(seed, step, rank)
    counts = split_counts(batch_short, SHORT_TASKS)
    per_task = {t: sample(t, "train", data_seed, counts[t]) for t in SHORT_TASKS}
    # Interleave the tasks, so that the stratified mask rates (by batch index) spread over every task.
    groups = {"short": [per_task[t][i] for i in range(max(counts.values())) for t in SHORT_TASKS if i < counts[t]]}
    if batch_long:
        counts = split_counts(batch_long, LONG_TASKS)
        groups["long"] = [ex for t in LONG_TASKS for ex in sample(t, "train", data_seed, counts[t])]
    return groups


def group_weights(groups) -> dict[str, float]:
    """Each layout group's weight in the loss: its tasks' part of the ``TASK_SHARES`` of the groups present."""
    totals = {g: sum(TASK_SHARES[t] for t in TASK_NAMES if TASKS[t].layout == g) for g in groups}
    return {g: v / sum(totals.values()) for g, v in totals.items()}
