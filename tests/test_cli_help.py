"""``--help`` of every command: plain text, defaults shown, and ``diffexit --help`` lists every command."""

import pytest

from diffexit.app.cli import COMMANDS, SINGLE, main
from diffexit.common.cli_help import plain

ALL = [f"{g} {n}".split() for g, n in COMMANDS] + [[name] for name in SINGLE]


def test_the_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for (group, name), (_, help_) in COMMANDS.items():
        assert f"diffexit {group} {name}" in out and help_ in out
    assert "diffexit demo" in out


@pytest.mark.parametrize("command", ALL, ids=[" ".join(c) for c in ALL])
def test_each_commands_help_is_plain_text_with_its_defaults(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out and ":func:" not in out and ":mod:" not in out and ":class:" not in out
    assert "(default: None)" not in out and "(default: False)" not in out


def test_plain_drops_sphinx_markup():
    assert plain("see :func:`~diffexit.dllm.generate` and ``x = 1``") == "see generate and x = 1"
    assert plain(":mod:`diffexit.uem.calibration`") == "diffexit.uem.calibration"


def test_defaults_show_without_a_help_string_and_when_zero():
    import argparse
    import re

    from diffexit.common.cli_help import HelpFormatter

    parser = argparse.ArgumentParser(prog="x", formatter_class=HelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak rate")
    parser.add_argument("--out", default=None, help="where")
    parser.add_argument("--resume", action="store_true", help="go on")
    text = parser.format_help()
    assert re.search(r"--seed SEED\s+\(default: 0\)", text) and "peak rate (default: 0.001)" in text
    assert re.search(r"--out OUT\s+where\n", text) and re.search(r"--resume\s+go on\n", text)
