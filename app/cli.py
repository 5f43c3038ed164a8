"""The ``diffexit`` command line.

``diffexit GROUP NAME [args]`` hands ``args`` to the ``main(argv, prog)`` of the module that implements
that command, so each command owns its own argparse parser, and ``diffexit --help`` stays fast (no torch
import).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# (group, name) -> (module implementing it, one-line help).
COMMANDS: dict[tuple[str, str], tuple[str, str]] = {
    ("bench", "kernels"): ("diffexit.app.bench.kernels", "time token_stats backends side by side"),
    ("bench", "text"): ("diffexit.app.bench.text", "SchED against full steps, Prophet and parallel commits on the embedded text model"),
    ("bench", "gemma"): ("diffexit.app.bench.gemma", "SchED against DiffusionGemma's own adaptive stopping, in its generate"),
    ("bench", "images"): ("diffexit.app.bench.images", "DeeDiff against full depth, static depth and FirstBlockCache on the embedded DiT"),
    ("generate", "images"): ("diffexit.app.generate_images", "batch image generation (resumable, accelerate-ready)"),
    ("generate", "text"): ("diffexit.app.generate_text", "batch text generation (resumable, accelerate-ready)"),
    ("train", "text"): ("diffexit.dllm.charlm.train", "train the embedded masked-diffusion text model"),
    ("train", "image"): ("diffexit.uem.digits.train", "train the embedded digits DiT backbone"),
    ("train", "uem"): ("diffexit.app.train_uem", "train DeeDiff uncertainty heads on a DiT"),
    ("train", "commit"): ("diffexit.app.train_commit", "the learned commit rule of a text model: train, calibrate, validate"),
    ("calibrate", "uem"): ("diffexit.app.calibrate_uem", "per-timestep exit thresholds within an error budget"),
    ("calibrate", "images"): ("diffexit.app.calibrate_images", "the cheapest steps x exits x cache plan for a PSNR target"),
    ("calibrate", "sched"): ("diffexit.app.calibrate_sched", "SchED parameters with a split-conformal risk bound"),
}
SINGLE = {"demo": ("diffexit.app.demo", "the Gradio demo on 127.0.0.1"),
          "eval": ("diffexit.app.eval.command", "lm-evaluation-harness with the diffexit model and the shipped tasks")}


def _parser() -> argparse.ArgumentParser:
    width = max(len(f"{g} {n}") for g, n in COMMANDS)
    listing = "\n".join(f"  diffexit {f'{g} {n}':<{width}}  {help_}" for (g, n), (_, help_) in COMMANDS.items())
    listing += "".join(f"\n  diffexit {name:<{width}}  {help_}" for name, (_, help_) in SINGLE.items())
    p = argparse.ArgumentParser(
        prog="diffexit",
        usage="diffexit COMMAND [NAME] [options]",
        description="Cheaper diffusion sampling: DeeDiff early exits (images), SchED halting (diffusion LMs).",
        epilog=f"commands:\n{listing}\n\nRun `diffexit COMMAND NAME --help` for a command's own options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="group", metavar="COMMAND", help=argparse.SUPPRESS)
    groups: dict[str, argparse._SubParsersAction] = {}
    for (group, name), (_, help_) in COMMANDS.items():
        if group not in groups:
            gp = sub.add_parser(group, help=f"{group} " + "|".join(n for g, n in COMMANDS if g == group))
            groups[group] = gp.add_subparsers(dest="name", metavar="NAME")
        groups[group].add_parser(name, help=help_, add_help=False)
    for name, (_, help_) in SINGLE.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    group = argv[0]
    if group in SINGLE:
        key, rest, module = group, argv[1:], SINGLE[group][0]
    else:
        names = [n for g, n in COMMANDS if g == group]
        if not names:
            parser.error(f"unknown command {group!r}; choose one of {sorted({g for g, _ in COMMANDS} | set(SINGLE))}")
        if len(argv) < 2 or argv[1] not in names:
            if len(argv) >= 2 and argv[1] in ("-h", "--help"):
                parser.parse_args([group, "--help"])
            got = repr(argv[1]) if len(argv) >= 2 else "nothing"
            parser.error(f"`diffexit {group}` needs one of {names}, got {got}")
        key, rest, module = f"{group} {argv[1]}", argv[2:], COMMANDS[(group, argv[1])][0]
    return int(importlib.import_module(module).main(rest, prog=f"diffexit {key}") or 0)


if __name__ == "__main__":
    sys.exit(main())
