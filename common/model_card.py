"""``MODEL_CARD.md`` beside shipped weights: one layout for every model diffexit trains.

A card is a title, a paragraph saying what the model is and how to load it, a list of facts (architecture, data,
objective, training, command...) and sections of measured figures. Each trainer fills them in; this module only
lays them out and writes the file atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .results import atomic_write_bytes

CARD_NAME = "MODEL_CARD.md"


def model_card(title: str, intro: str, facts: dict[str, str], sections: Sequence[tuple[str, str]] = ()) -> str:
    """The card's markdown: ``# title``, ``intro``, one ``- **Name.** text`` bullet per fact, then ``## heading``
    and body per section."""
    bullets = "\n".join(f"- **{name}.** {text}" for name, text in facts.items())
    body = "".join(f"\n## {heading}\n\n{text.strip()}\n" for heading, text in sections)
    return f"# {title}\n\n{intro.strip()}\n\n{bullets}\n{body}"


def write_model_card(directory: Path, text: str) -> Path:
    """Write ``text`` to ``directory/MODEL_CARD.md`` atomically; returns the path."""
    path = Path(directory) / CARD_NAME
    atomic_write_bytes(path, text.encode())
    return path
