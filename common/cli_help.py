"""How every ``diffexit`` command prints ``--help``: plain text, with each option's default.

Descriptions come from module docstrings, which are written for Sphinx; :func:`plain` drops the markup
(````code````, ``:func:`~pkg.name``` ...) so a terminal shows ``code`` and ``name``.
"""

from __future__ import annotations

import argparse
import copy
import re

_ROLE = re.compile(r":[a-z]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")


def plain(text: str) -> str:
    """``text`` without reStructuredText markup: roles keep their target's last part, literals lose their quotes."""
    def role(match):
        target = match.group(1).strip()
        return target.rsplit(".", 1)[-1] if match.group(0).startswith((":func:`~", ":class:`~", ":meth:`~",
                                                                         ":mod:`~", ":attr:`~")) else target

    return _ROLE.sub(role, text).replace("``", "")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout, shows every option's default (0 included; not for flags, which take no
    value, nor None), and prints plain text."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain(text))

    @staticmethod
    def _shows_default(action) -> bool:
        return (bool(action.option_strings) and action.nargs != 0 and action.default is not None
                and action.default is not argparse.SUPPRESS)

    def _format_action(self, action) -> str:
        # argparse prints no help column for an option without help text, so give it one for its default.
        if not action.help and self._shows_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if "default" not in text and self._shows_default(action):  # some helps word their default themselves
            text += " (default: %(default)s)"
        return text

    def _expand_help(self, action) -> str:
        return plain(super()._expand_help(action))
