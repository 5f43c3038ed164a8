"""``diffexit train text`` at its seams: bad input is refused in one line before any work, and a trainer killed with
SIGKILL at any point (between steps, inside a checkpoint's save, between its renames) resumes from its last complete
checkpoint to the very weights and metrics of a run never interrupted."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from diffexit.dllm.charlm import train as train_mod

TINY = ["--hidden", "32", "--layers", "1", "--heads", "4", "--batch-short", "16", "--batch-long", "1",
        "--eval-every", "2", "--decode-every", "0", "--checkpoint-every", "2", "--warmup", "1", "--lr", "3e-3",
        "--threads", "1"]
STEPS = ["--steps", "4"]


@pytest.mark.parametrize("flags, message", [
    (["--steps", "-5"], "--steps must be positive, got -5"),
    (["--steps", "0"], "--steps must be positive, got 0"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--lr=-1e-3"], "--lr must be positive"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--warmup", "5"], "--warmup 5 is longer than the run's --steps 4"),
    (["--batch-short", "0"], "--batch-short must be positive"),
    (["--batch-long", "-1"], "--batch-long must be >= 0"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be positive"),
    (["--threads", "0"], "--threads must be positive"),
    (["--truncate-prob", "nan"], "--truncate-prob must be a finite number"),
    (["--resume"], "no checkpoint in"),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        train_mod.main(["--out", str(out), *TINY, *STEPS, *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("diffexit train text: error: ") and message in err[-1], err
    assert not out.exists()


def test_resume_without_a_checkpoint_says_how_to_start(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_mod.main(["--out", str(tmp_path), "--resume", *TINY, *STEPS])
    assert "start the run without --resume" in capsys.readouterr().err


def test_out_or_export_naming_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for flags in (["--out", str(tmp_path / "file")], ["--out", str(tmp_path / "run"), "--export", str(tmp_path / "file")]):
        with pytest.raises(SystemExit):
            train_mod.main([*flags, *TINY, *STEPS])
        assert f"{tmp_path / 'file'} is a file; pass a folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# A kill, made deterministic: the trainer runs in a child process that sends itself SIGKILL at the chosen point.
KILLER = """
import os, pathlib, signal, sys
import accelerate
from diffexit.dllm.charlm import train

where = sys.argv[1]
saves = [0]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if where == "between-steps":
    real_loss = train.training_loss
    def loss(model, tok, step, args, rank):
        if step == 3:  # after the checkpoint at step 2, once step 3's metrics are logged
            die()
        return real_loss(model, tok, step, args, rank)
    train.training_loss = loss
elif where == "inside-save":
    real_save = accelerate.Accelerator.save_state
    def save_state(self, path, *a, **k):
        saves[0] += 1
        result = real_save(self, path, *a, **k)
        if saves[0] == 2:  # the second checkpoint's files are written, its state.json and rename are not
            die()
        return result
    accelerate.Accelerator.save_state = save_state
elif where == "between-renames":
    real_rename = pathlib.Path.rename
    def rename(self, target):
        if self.name == "checkpoint.partial":
            saves[0] += 1
            if saves[0] == 2:  # the old checkpoint moved aside, the new one not yet in place
                die()
        return real_rename(self, target)
    pathlib.Path.rename = rename
train.main(sys.argv[2:])
"""


def _steps_logged(run):
    return [(r["step"], r["loss"], r["lr"], r.get("masked_accuracy"))
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    assert train_mod.main(["--out", str(run), *TINY, *STEPS]) == 0
    return run


@pytest.mark.parametrize("where", ["between-steps", "inside-save", "between-renames"])
def test_a_killed_trainer_resumes_to_the_uninterrupted_result(tmp_path, straight, where):
    run = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILLER, where, "--out", str(run), *TINY, *STEPS],
                            cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert train_mod.main(["--out", str(run), "--resume", *TINY, *STEPS]) == 0

    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and [(leg["from_step"], leg["steps"]) for leg in state["legs"]] == [(0, 4)]
    a, b = (load_file(d / "checkpoint" / "model.safetensors") for d in (straight, run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _steps_logged(run) == _steps_logged(straight)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "metrics.jsonl"]
