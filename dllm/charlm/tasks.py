"""Generated, checkable text tasks for the embedded masked-diffusion model, with exact scorers.

Every task maps a seeded ``random.Random`` to a ``(prompt, answer)`` pair of strings, and scores an output by
what makes it right. Each prompt starts with the task's tag, so one model serves them all.

Deterministic tasks (one right answer; the output must equal it):

- ``add``: ``add:012345+000678`` -> ``0013023``. Operands of 1-6 digits, zero-padded to 6; the sum to 7.
  Fixed width is what a small bidirectional model learns (docs/design.md).
- ``sort``: ``sort:5281746`` -> ``1245678``. 6-10 digits, repeats allowed.
- ``reverse``: ``rev:kbtqzea`` -> ``aezqtbk``. 6-10 lowercase letters.
- ``count``: ``count:0417`` -> ``0417 0418 ... 0442``, 26 four-digit numbers counting up from the start (129
  characters). The long-form task. Each number follows from its neighbour, so a model that decodes a few
  tokens at a time carries certainty along the span, while filling every position at once must add the
  position's offset to the start everywhere.

Coupled tasks (several valid answers whose tokens must agree; the scorer checks validity). Training answers
are drawn uniformly from the valid ones, so with every position masked each token's marginal is spread over
several choices: filling all masks at once mixes answers, and only committing a few tokens at a time keeps
them consistent (docs/design.md, "What a first CPU experiment measured (text)"):

- ``sum_pair``: ``pair:58`` -> ``23+35``, any two 2-digit (zero-padded) numbers that sum to N (0-99).
- ``permute``: ``perm:dcbae`` -> ``bdeac``, any permutation of 4-6 distinct lowercase letters.
- ``spell``: ``spell:kovr,tuma,zepi`` -> ``t-u-m-a``, any one of three 4-letter words, letters joined by ``-``.

Layouts. Every prompt is left-padded to 24 positions, so every answer starts at position 24; the span is 16
tokens for the short tasks and 136 for ``count``, and ``[EOS]`` fills it after the answer. ``DECODE`` gives
each span's full-step decoding (block length and steps).

Splits. A prompt belongs to the held-out split when a CRC32 of ``task|prompt`` is 0 mod 10, and to the training
split otherwise, so held-out prompts are never trained on (for ``sum_pair``, about a tenth of the values of N are
never seen). Within a split, ``sample(task, split, seed, n)`` is a pure function of its arguments.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from typing import Callable

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SPLITS = ("train", "heldout")
HELDOUT_MODULUS = 10


@dataclass(frozen=True)
class Layout:
    """Where a task's tokens go: ``prompt_length`` left-padded prompt positions, then ``span_length`` answer ones."""

    prompt_length: int
    span_length: int

    @property
    def seq_length(self) -> int:
        return self.prompt_length + self.span_length


LAYOUTS = {"short": Layout(prompt_length=24, span_length=16), "long": Layout(prompt_length=24, span_length=136)}
# Full-step decoding per span length: (block_length, steps), one token per step. The short span is one block;
# the long one is decoded semi-autoregressively in 4 blocks of 34. Benchmarks, calibration, the demo and the
# batch script all decode this way, so their figures compare.
DECODE = {LAYOUTS["short"].span_length: (16, 16), LAYOUTS["long"].span_length: (34, 136)}


@dataclass(frozen=True)
class Task:
    """A task: ``make(rng) -> (prompt, answer)`` draws one example, ``valid(prompt, output) -> bool`` scores one."""

    name: str
    layout: str
    coupled: bool
    make: Callable[[random.Random], tuple[str, str]]
    valid: Callable[[str, str], bool]


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str


def _payload(prompt: str, tag: str, pattern: str) -> re.Match:
    if not prompt.startswith(tag):
        raise ValueError(f"prompt {prompt!r} does not start with the task tag {tag!r}")
    match = re.fullmatch(pattern, prompt[len(tag):])
    if match is None:
        raise ValueError(f"prompt {prompt!r} is malformed: after {tag!r} it must match {pattern!r}")
    return match


# add ------------------------------------------------------------------------------------------------------------

def _operand(rng: random.Random) -> int:
    # Draw the digit count first, so that short operands are as common as long ones.
    digits = rng.randint(1, 6)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def _make_add(rng: random.Random) -> tuple[str, str]:
    a, b = _operand(rng), _operand(rng)
    return f"add:{a:06d}+{b:06d}", f"{a + b:07d}"


def _valid_add(prompt: str, output: str) -> bool:
    m = _payload(prompt, "add:", r"(\d{6})\+(\d{6})")
    return output == f"{int(m[1]) + int(m[2]):07d}"


# sort -----------------------------------------------------------------------------------------------------------

def _make_sort(rng: random.Random) -> tuple[str, str]:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(6, 10)))
    return f"sort:{digits}", "".join(sorted(digits))


def _valid_sort(prompt: str, output: str) -> bool:
    return output == "".join(sorted(_payload(prompt, "sort:", r"(\d+)")[1]))


# reverse --------------------------------------------------------------------------------------------------------

def _make_reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(6, 10)))
    return f"rev:{word}", word[::-1]


def _valid_reverse(prompt: str, output: str) -> bool:
    return output == _payload(prompt, "rev:", r"([a-z]+)")[1][::-1]


# count ----------------------------------------------------------------------------------------------------------

COUNT_TERMS = 26


def _count_answer(start: int) -> str:
    return " ".join(f"{start + k:04d}" for k in range(COUNT_TERMS))


def _make_count(rng: random.Random) -> tuple[str, str]:
    start = rng.randint(0, 9999 - (COUNT_TERMS - 1))
    return f"count:{start:04d}", _count_answer(start)


def _valid_count(prompt: str, output: str) -> bool:
    start = int(_payload(prompt, "count:", r"(\d{4})")[1])
    if start + COUNT_TERMS - 1 > 9999:
        raise ValueError(f"prompt {prompt!r}: counting {COUNT_TERMS} numbers from {start} leaves 4 digits; "
                         f"start at most {9999 - (COUNT_TERMS - 1)}")
    return output == _count_answer(start)


# sum_pair -------------------------------------------------------------------------------------------------------

def _make_sum_pair(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 99)
    a = rng.randint(0, n)
    return f"pair:{n:02d}", f"{a:02d}+{n - a:02d}"


def _valid_sum_pair(prompt: str, output: str) -> bool:
    n = int(_payload(prompt, "pair:", r"(\d{2})")[1])
    m = re.fullmatch(r"(\d+)\+(\d+)", output)
    return m is not None and int(m[1]) + int(m[2]) == n


# permute --------------------------------------------------------------------------------------------------------

def _make_permute(rng: random.Random) -> tuple[str, str]:
    letters = rng.sample(LETTERS, rng.randint(4, 6))
    answer = letters[:]
    rng.shuffle(answer)
    return f"perm:{''.join(letters)}", "".join(answer)


def _valid_permute(prompt: str, output: str) -> bool:
    letters = _payload(prompt, "perm:", r"([a-z]+)")[1]
    return sorted(output) == sorted(letters)


# spell ----------------------------------------------------------------------------------------------------------

def _make_spell(rng: random.Random) -> tuple[str, str]:
    # Equal-length words keep each letter at a fixed position, so the choice of word is the only hard part.
    words = ["".join(rng.choice(LETTERS) for _ in range(4)) for _ in range(3)]
    return f"spell:{','.join(words)}", "-".join(rng.choice(words))


def _valid_spell(prompt: str, output: str) -> bool:
    words = _payload(prompt, "spell:", r"([a-z]+(?:,[a-z]+)*)")[1].split(",")
    return output in {"-".join(w) for w in words}


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("add", "short", False, _make_add, _valid_add),
        Task("sort", "short", False, _make_sort, _valid_sort),
        Task("reverse", "short", False, _make_reverse, _valid_reverse),
        Task("count", "long", False, _make_count, _valid_count),
        Task("sum_pair", "short", True, _make_sum_pair, _valid_sum_pair),
        Task("permute", "short", True, _make_permute, _valid_permute),
        Task("spell", "short", True, _make_spell, _valid_spell),
    )
}
TASK_NAMES = tuple(TASKS)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {list(TASKS)}")
    return TASKS[name]


def layout_of(task: str) -> Layout:
    """The prompt/span layout ``task`` is trained and decoded with."""
    return LAYOUTS[get_task(task).layout]


def split_of(task: str, prompt: str) -> str:
    """``"heldout"`` or ``"train"``: which split ``prompt`` belongs to, by a stable hash of task and prompt."""
    return "heldout" if zlib.crc32(f"{task}|{prompt}".encode()) % HELDOUT_MODULUS == 0 else "train"


def sample(task: str, split: str, seed: int, n: int) -> list[Example]:
    """``n`` examples of ``task`` from ``split``, a pure function of ``(task, split, seed, n)``.

    Draws are rejected until their prompt falls in ``split``; the first ``k`` of ``sample(..., n)`` equal
    ``sample(..., k)``.
    """
    spec = get_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{task}/{split}/{seed}")
    out: list[Example] = []
    while len(out) < n:
        prompt, answer = spec.make(rng)
        if split_of(task, prompt) == split:
            out.append(Example(task, prompt, answer))
    return out


def score(task: str, prompt: str, output: str) -> bool:
    """Whether ``output`` (the decoded answer, without ``[EOS]``) is a right answer to ``prompt``; exact, no stripping.

    Raises ``ValueError`` if ``prompt`` is not a well-formed ``task`` prompt.
    """
    return get_task(task).valid(prompt, output)
