"""The package as it is installed: the editable build that ``scripts/setup.sh`` asks pip for and the wheel build both
finish without a setuptools warning (issue #30: a newcomer's setup warned once per weights folder, read as a package
missing from ``packages``), and the wheel holds every file git tracks in the package folders, the shipped weights and
the eval tasks among them. Built offline from a copy of the checkout's tracked files, so the checkout gets no
``build/`` or egg-info of its own."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def tracked_files():
    """Paths (relative to the repository root) of the files git tracks that are in the working tree."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return [Path(p) for p in out.split("\0") if p and (ROOT / p).is_file()]


def expected_in_wheel(files):
    """``{path in the wheel}`` for the tracked ``files`` that belong to a package of ``package-dir``: the root's own
    modules (the ``diffexit`` package itself) and everything under each subpackage's folder."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    expected = set()
    for package, folder in package_dir.items():
        prefix = package.replace(".", "/")
        for f in files:
            if folder == ".":
                if len(f.parts) == 1 and f.suffix == ".py":
                    expected.add(f"{prefix}/{f}")
            elif f.parts[0] == folder:
                expected.add(f"{prefix}/{Path(*f.parts[1:]).as_posix()}")
    return expected


def warnings_in(log):
    return [line for line in log.splitlines() if re.search("warn", line, re.IGNORECASE)]


def build(cmd, cwd):
    # PYTHONDONTWRITEBYTECODE makes distutils warn that it skips byte-compiling: a note on this shell, not on the
    # package's configuration.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    run = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    return log


def test_the_editable_and_wheel_builds_do_not_warn_and_the_wheel_ships_every_package_file(tmp_path):
    files = tracked_files()
    src = tmp_path / "src"
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)

    # The PEP 660 hook that `pip install -e .` calls (setup.sh's install), where the undeclared-package warnings
    # appeared; pip itself shows a backend's output only on failure.
    editable = build([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                      "build_meta.build_editable(sys.argv[1])", str(tmp_path / "editable")], cwd=src)
    assert warnings_in(editable) == []

    wheel_log = build([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-v",
                       "-w", str(tmp_path / "wheel"), str(src)], cwd=tmp_path)
    assert warnings_in(wheel_log) == []

    (wheel,) = (tmp_path / "wheel").glob("diffexit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = expected_in_wheel(files)
    # The shipped models and the lm-eval tasks are what a wheel built without package data would lose.
    assert {"diffexit/__init__.py", "diffexit/dllm/charlm/weights/model.safetensors",
            "diffexit/dllm/charlm/weights-block/model.safetensors",
            "diffexit/dllm/charlm/weights-gemma/model.safetensors",
            "diffexit/uem/digits/weights/classifier/classifier.safetensors"} <= expected
    assert any(re.fullmatch(r"diffexit/app/eval/tasks/[^/]+\.yaml", n) for n in expected)
    assert sorted(expected - names) == []
