"""One job per output folder (``diffexit.app.jobs.lock_out_dir``): a second job is refused while the first runs, a
killed job's lock never blocks the rerun that resumes it, and nobody deletes another job's temp file."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from diffexit.app import generate_images, generate_text, jobs
from diffexit.app.job_inputs import Item, make_job

ITEMS = ("a", "b", "c")
# A job whose engine writes each item's file; on item "b" it leaves a temp file as a write in progress would, says
# so in OUT/holding, and blocks, holding the folder's lock, until it is killed.
HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from diffexit.app import jobs
    from diffexit.app.job_inputs import Item, make_job

    out = Path(sys.argv[1])

    class Engine:
        def files(self, item):
            return [item.id + ".txt"]

        def run(self, items):
            for item in items:
                if item.id == "b":
                    (out / ".b.txt.inflight.tmp").write_text("half")
                    (out / "holding").write_text("")
                    time.sleep(600)
            return [({"id": item.id}, {item.id + ".txt": item.id.encode()}) for item in items]

    job = make_job([Item(i, None, {}) for i in %r], 1)
    jobs.run_job(out, jobs.job_spec({"command": "test"}, job), job, Engine(), manifest="m.jsonl", desc="holder")
""" % (ITEMS,))


class Engine:
    def files(self, item):
        return [item.id + ".txt"]

    def run(self, items):
        return [({"id": item.id}, {item.id + ".txt": item.id.encode()}) for item in items]


def _job():
    job = make_job([Item(i, None, {}) for i in ITEMS], 1)
    return job, jobs.job_spec({"command": "test"}, job)


@pytest.fixture
def holder(tmp_path):
    """``(out, process)``: a job that holds ``out``'s lock, mid-way through its items, until it is killed."""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "holding").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (out / "holding").exists(), proc.communicate()[1][-3000:] if proc.poll() is not None else "no start"
    yield out, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_second_job_is_refused_while_the_first_holds_the_folder(holder):
    out, proc = holder
    job, spec = _job()
    with pytest.raises(jobs.JobError) as refused:
        jobs.run_job(out, spec, job, Engine(), manifest="m.jsonl", desc="second")
    message = str(refused.value)
    assert f"output folder {out.resolve()} is in use by another diffexit job (pid {proc.pid} on host" in message
    assert "wait for it to end and rerun to resume, or pass another --out" in message
    # The holder's write in progress is untouched, and the second job wrote nothing.
    assert (out / ".b.txt.inflight.tmp").read_text() == "half"
    assert not (out / "c.txt").exists() and not (out / "m.jsonl").exists()


def test_after_the_holder_is_killed_a_new_job_resumes_and_finishes(holder):
    out, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "a.txt").exists() and not (out / "b.txt").exists()
    job, spec = _job()
    result = jobs.run_job(out, spec, job, Engine(), manifest="m.jsonl", desc="resume")
    assert result.generated == 2  # "a" was complete already
    assert [json.loads(line)["id"] for line in (out / "m.jsonl").read_text().splitlines()] == list(ITEMS)
    # The killed job's temp file is stale now, so the new holder removes it; a finished job leaves no lock file.
    assert not list(out.glob(".*.tmp")) and not (out / jobs.LOCK_FILE).exists()


@pytest.mark.parametrize("command", ["text", "images"])
def test_the_commands_refuse_a_folder_in_use_before_loading_a_model(command, holder, capsys):
    out, proc = holder
    # A model that does not exist: the lock is checked first, so the refusal, not the missing model, is reported.
    if command == "text":
        code = generate_text.main(["--task", "pick", "--n", "1", "--model", str(out / "no-model"), "--out", str(out)])
    else:
        code = generate_images.main(["--per-class", "1", "--pipeline", str(out / "no-pipeline"), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"is in use by another diffexit job (pid {proc.pid} on host" in err and "no such folder" not in err
    assert (out / ".b.txt.inflight.tmp").read_text() == "half"


def test_the_lock_is_taken_again_once_released(tmp_path):
    from diffexit.app.jobs import lock_out_dir, process_state

    state = process_state()
    for _ in range(2):
        with lock_out_dir(tmp_path, state):
            with lock_out_dir(tmp_path, state):  # nested on the same folder: held once, by the outer block
                assert (tmp_path / jobs.LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on host")
            assert (tmp_path / jobs.LOCK_FILE).exists()
        assert not (tmp_path / jobs.LOCK_FILE).exists()


def test_a_folder_that_cannot_hold_the_lock_is_one_clear_error(tmp_path):
    from diffexit.app.jobs import lock_out_dir, process_state

    with pytest.raises(jobs.JobError, match=f"cannot create the lock file {tmp_path / 'gone'}/.job.lock: No such"):
        with lock_out_dir(tmp_path / "gone", process_state()):
            pass
