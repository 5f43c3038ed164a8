"""Every script under benchmarks/ runs, as a user runs it: ``python benchmarks/NAME.py`` from another folder, on
tiny sizes. A script whose imports or calls went stale against today's API fails here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# Script -> tiny arguments and a line its output must hold.
TINY = {
    "generate_throughput.py": (["--images", "2", "--image-steps", "2", "--prompts", "2", "--batches", "2"],
                               "| text | sched | 2 |"),
    "halting_overhead.py": (["--repeats", "1", "--batches", "1", "--layouts", "short"], "| short | 1 | none |"),
    "uem_overhead.py": (["--hidden", "32", "--batch", "1", "--rounds", "1"], "| 32 | 1 |"),
}


def _run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # One thread: the models are tiny, and the suite may share the cores with other work.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


def test_every_script_is_covered():
    assert sorted(p.name for p in BENCHMARKS.glob("*.py")) == sorted([*TINY, "kernels_gpu.py"])


@pytest.mark.parametrize("script", sorted(TINY))
def test_script_runs_on_tiny_inputs(script, tmp_path):
    args, expected = TINY[script]
    done = _run(script, args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert expected in done.stdout, done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answer; the GPU run is the slow test below")
def test_kernels_gpu_refuses_without_cuda(tmp_path):
    # It gets past its imports (which a stale name would break) and says what it needs.
    done = _run("kernels_gpu.py", [str(tmp_path / "out")], tmp_path)
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_gpu_passes_on_cuda(tmp_path):
    done = _run("kernels_gpu.py", [str(tmp_path / "out")], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "FAIL" not in done.stdout
    assert (tmp_path / "out" / "kernels" / "results.json").is_file()


# `diffexit bench kernels --out`: checked before the timing, written atomically -------------------------------------

def test_bench_kernels_refuses_a_file_as_out_before_timing(tmp_path, capsys, monkeypatch):
    from diffexit.app.bench import kernels

    def never(*args):
        raise AssertionError("the benchmark ran before --out was checked")

    monkeypatch.setattr(kernels, "_bench_one", never)
    (tmp_path / "taken").write_text("x")
    with pytest.raises(SystemExit) as exit_:
        kernels.main(["--out", str(tmp_path / "taken"), "--shape", "2x50", "--dtype", "fp32"],
                     prog="diffexit bench kernels")
    assert exit_.value.code == 2
    assert f"output folder {tmp_path / 'taken'} exists and is not a folder" in capsys.readouterr().err
    assert (tmp_path / "taken").read_text() == "x"


def test_bench_kernels_makes_a_missing_out_and_leaves_no_temp_files(tmp_path):
    from diffexit.app.bench import kernels

    out = tmp_path / "missing" / "parent"
    assert kernels.main(["--quick", "--out", str(out), "--shape", "2x50", "--dtype", "fp32"],
                        prog="diffexit bench kernels") == 0
    assert sorted(p.name for p in out.iterdir()) == ["kernels.png", "results.json"]
    # Rerunning into the same folder replaces both.
    assert kernels.main(["--quick", "--out", str(out), "--shape", "2x50", "--dtype", "fp32"],
                        prog="diffexit bench kernels") == 0
    assert sorted(p.name for p in out.iterdir()) == ["kernels.png", "results.json"]
