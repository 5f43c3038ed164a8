"""Generated, checkable text tasks for the embedded masked-diffusion model, with exact scorers.

Every task maps a seeded ``random.Random`` to a ``(prompt, answer)`` pair of strings, and scores an output by
what makes it right. Each prompt starts with the task's tag, so one model serves them all.

Controls (one right answer, scored for equality). One-step decoding can solve them, so they cannot tell halting
rules apart; the benchmark reports them beside the others and leaves them out of its headline average:

- ``reverse``: ``rev:kbtqzea`` -> ``aezqtbk``. 6-10 lowercase letters.
- ``add``: ``add:012345+000678`` -> ``0013023``. Operands of 1-6 digits, zero-padded to 6; the sum to 7.
  Fixed width is what a small bidirectional model learns (docs/design.md).

Discriminating tasks: several valid answers whose tokens must agree, scored for validity. Training answers are
drawn uniformly from the valid ones, so with every position masked each token's marginal is spread over the
choices: filling all masks at once mixes them, and only committing a few tokens at a time keeps them consistent
(docs/design.md, "What a first CPU experiment measured (text)"). Every choice is between words the prompt spells
out at fixed places, from disjoint alphabets, so once one token of a choice is committed the rest of it is a copy
from a fixed position (the step-by-step conditionals are easy; only the joint answer is hard):

- ``pick``: ``pick:ceah,jlon,wxrq`` -> ``jlon``: one of three 4-letter words (letters a-h, i-p, q-x).
- ``zip``: ``zip:cjbe,ouyx`` -> ``ocujybxe`` or ``coubjyex``: two 4-letter words (a-m, n-z) interleaved, either
  one first.
- ``trio``: ``trio:cjb,rou`` -> ``rou-cjb-rou``: three words, each either of two (a-m, n-z), joined by ``-``.
- ``chain``: ``chain:cjbe,ouyx`` -> ``ouyx cjbe cjbe ouyx ...``: the long-form task, 26 words, each either of two
  (129 characters): a long chain of choices, where a rule that halts before the last one changes the answer.

Layouts. Every prompt is left-padded to 24 positions, so every answer starts at position 24; the span is 16
tokens for the short tasks and 136 for ``chain``, and ``[EOS]`` fills it after the answer. ``DECODE`` gives
each span's full-step decoding (block length and steps).

Splits. A prompt belongs to the held-out split when a CRC32 of ``task|prompt`` is 0 mod 10, and to the training
split otherwise, so held-out prompts are never trained on. Within a split, ``sample(task, split, seed, n)`` is a
pure function of its arguments.
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


PROMPT_LENGTH = 24  # every layout's: answers start at the same position
LAYOUTS = {"short": Layout(prompt_length=PROMPT_LENGTH, span_length=16),
           "long": Layout(prompt_length=PROMPT_LENGTH, span_length=136)}
# Full-step decoding per span length: (block_length, steps), one token per step, semi-autoregressive as LLaDA
# decodes: short spans in 4 blocks of 4, the long one in 4 blocks of 34. Benchmarks, calibration, the demo and the
# batch script all decode this way, so their figures compare.
DECODE = {LAYOUTS["short"].span_length: (4, 16), LAYOUTS["long"].span_length: (34, 136)}
# The tasks one-step decoding can solve: reported, but left out of the headline average.
CONTROLS = ("reverse", "add")


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


# reverse --------------------------------------------------------------------------------------------------------

def _make_reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(6, 10)))
    return f"rev:{word}", word[::-1]


def _valid_reverse(prompt: str, output: str) -> bool:
    return output == _payload(prompt, "rev:", r"([a-z]+)")[1][::-1]


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


# The choices: words of distinct letters from disjoint alphabets, so a letter tells which word it belongs to.
THIRDS = ("abcdefgh", "ijklmnop", "qrstuvwx")
HALVES = ("abcdefghijklm", "nopqrstuvwxyz")


def _words(rng: random.Random, alphabets, length: int) -> list[str]:
    return ["".join(rng.sample(alphabet, length)) for alphabet in alphabets]


def _choices(prompt: str, tag: str, count: int, length: int) -> list[str]:
    words = _payload(prompt, tag, ",".join([f"([a-z]{{{length}}})"] * count))
    return [words[i + 1] for i in range(count)]


# pick -----------------------------------------------------------------------------------------------------------

def _make_pick(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, THIRDS, 4)
    return "pick:" + ",".join(words), rng.choice(words)


def _valid_pick(prompt: str, output: str) -> bool:
    return output in _choices(prompt, "pick:", 3, 4)


# zip ------------------------------------------------------------------------------------------------------------

def _interleave(first: str, second: str) -> str:
    return "".join(x + y for x, y in zip(first, second))


def _make_zip(rng: random.Random) -> tuple[str, str]:
    a, b = _words(rng, HALVES, 4)
    return f"zip:{a},{b}", _interleave(a, b) if rng.random() < 0.5 else _interleave(b, a)


def _valid_zip(prompt: str, output: str) -> bool:
    a, b = _choices(prompt, "zip:", 2, 4)
    return output in (_interleave(a, b), _interleave(b, a))


# trio -----------------------------------------------------------------------------------------------------------

def _make_trio(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, HALVES, 3)
    return "trio:" + ",".join(words), "-".join(rng.choice(words) for _ in range(3))


def _valid_trio(prompt: str, output: str) -> bool:
    words = _choices(prompt, "trio:", 2, 3)
    parts = output.split("-")
    return len(parts) == 3 and all(p in words for p in parts)


# chain ----------------------------------------------------------------------------------------------------------

CHAIN_WORDS = 26


def _make_chain(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, HALVES, 4)
    return "chain:" + ",".join(words), " ".join(rng.choice(words) for _ in range(CHAIN_WORDS))


def _valid_chain(prompt: str, output: str) -> bool:
    words = _choices(prompt, "chain:", 2, 4)
    parts = output.split(" ")
    return len(parts) == CHAIN_WORDS and all(p in words for p in parts)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("reverse", "short", False, _make_reverse, _valid_reverse),
        Task("add", "short", False, _make_add, _valid_add),
        Task("pick", "short", True, _make_pick, _valid_pick),
        Task("zip", "short", True, _make_zip, _valid_zip),
        Task("trio", "short", True, _make_trio, _valid_trio),
        Task("chain", "long", True, _make_chain, _valid_chain),
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
