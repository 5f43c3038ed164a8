"""``diffexit eval``: lm-eval with the ``diffexit`` model and the shipped offline tasks.

The model's answers and forward passes are checked against ``diffexit generate text`` on the same prompts and spec
(an independent path: generate text's own job machinery); the shipped data against the task sampler; bad
``--model_args`` and a log-likelihood task with the estimator off against their messages (the estimator itself:
test_eval_loglikelihood.py); two processes against one (slow).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from diffexit.app.eval.command import TASKS_DIR, main as eval_main  # noqa: E402
from diffexit.app.generate_text import run as generate_text  # noqa: E402
from diffexit.dllm.charlm.tasks import TASK_NAMES, sample  # noqa: E402

SCHED = "method=sched,schedule=cosine:7.5:2.5,stat=quantile"


@pytest.fixture(autouse=True)
def fresh_lm_eval_log_handler():
    """lm-eval's log handler keeps the stderr it was made with (one command per process in real use); a handler
    made under an earlier test's capture would write to a closed stream, so each test's command makes its own."""
    import logging

    import lm_eval.utils

    yield
    logger = logging.getLogger("lm_eval")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    lm_eval.utils._LOGGING_CONFIGURED = False


def _samples(out: Path, task: str) -> list[dict]:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])


def _results(out: Path) -> dict:
    (path,) = out.rglob("results_*.json")
    return json.loads(path.read_text())["results"]


def _generate_text(tmp_path, task: str, n: int, *flags) -> list[dict]:
    docs = [json.loads(line) for line in (TASKS_DIR / "data" / f"{task}.jsonl").read_text().splitlines()][:n]
    prompts = tmp_path / f"{task}.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": d["prompt"], "task": task}) + "\n" for d in docs))
    out = tmp_path / f"gen-{task}"
    generate_text(["--prompts", str(prompts), *flags, "--out", str(out)])
    return [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sched_eval(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    code = eval_main(["--tasks", "diffexit_zip,diffexit_chain", "--limit", "3", "--batch_size", "2",
                      "--model_args", SCHED, "--log_samples", "--output_path", str(out)])
    assert code == 0
    return out


def test_answers_and_forward_passes_equal_generate_text(sched_eval, tmp_path):
    for task, n in (("zip", 3), ("chain", 3)):
        want = _generate_text(tmp_path, task, n, "--method", "sched", "--schedule", "cosine:7.5:2.5",
                              "--stat", "quantile")
        got = _samples(sched_eval, f"diffexit_{task}")
        assert [s["resps"][0][0] for s in got] == [r["output"] for r in want]
        assert [s["diffexit"][0]["nfe"] for s in got] == [r["nfe"] for r in want]
        assert [s["exact_match"] for s in got] == [float(r["correct"]) for r in want]


def test_results_json_holds_the_metric_of_every_task(sched_eval):
    # Named after the model (the embedded default here), not lm-eval's random folder name.
    assert [p.parent.name for p in sched_eval.rglob("results_*.json")] == ["charlm"]
    results = _results(sched_eval)
    assert set(results) == {"diffexit_zip", "diffexit_chain"}
    for task in results.values():
        assert 0.0 <= task["exact_match,none"] <= 1.0
    for sample in _samples(sched_eval, "diffexit_zip"):
        (request,) = sample["diffexit"]
        assert request["nfe"] >= 1 and request["seconds"] > 0


def test_shipped_data_is_the_task_sampler_draw_0():
    for task in TASK_NAMES:
        rows = [json.loads(line) for line in (TASKS_DIR / "data" / f"{task}.jsonl").read_text().splitlines()]
        want = sample(task, "heldout", 0, 200)
        assert rows == [{"task": task, "prompt": e.prompt, "answer": e.answer} for e in want]
        assert (TASKS_DIR / f"diffexit_{task}.yaml").is_file()


@pytest.mark.parametrize("options, message", [
    ({"model": "charlm", "temprature": 0}, "unknown --model_args key(s) ['temprature']; the keys are ['model', "),
    ({"steps": "abc"}, "steps must be a positive whole number, got 'abc'"),
    ({"method": "sched", "stat": "mode"}, "stat"),
    ({"model": "no-such-model"}, "no-such-model"),
    ({"halting": "sched", "method": "sched"}, "give the halting rule once"),
])
def test_bad_model_args_name_the_problem(options, message):
    from diffexit.app.eval.lm import DiffexitLM

    with pytest.raises(ValueError) as e:
        DiffexitLM(**options)
    assert message in str(e.value)


def test_the_command_reports_bad_model_args_in_one_line(tmp_path, capsys):
    code = eval_main(["--tasks", "diffexit_pick", "--limit", "1", "--model_args", "model=charlm,temprature=0",
                      "--output_path", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "diffexit eval: error: unknown --model_args key(s) ['temprature']" in err
    assert "Traceback" not in err


def test_a_loglikelihood_task_with_the_estimator_off_says_so(tmp_path, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(
        "import datasets\n"
        "def docs(**kwargs):\n"
        "    return datasets.DatasetDict({'test': datasets.Dataset.from_list([{'q': 'pick:abcd,efgh,ijkl', 'a': 'abcd'}])})\n")
    (tasks / "ll.yaml").write_text(
        "task: user_ll\noutput_type: loglikelihood\ncustom_dataset: !function utils.docs\ntest_split: test\n"
        "doc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\nmetric_list:\n  - metric: acc\n")
    code = eval_main(["--tasks", "user_ll,diffexit_pick", "--limit", "1", "--include_path", str(tasks),
                      "--model_args", "mc_num=0"])
    err = capsys.readouterr().err
    assert code == 2
    assert "diffexit eval: error: this task scores log-likelihoods and mc_num=0 turns the estimator off" in err
    assert "Traceback" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_single_process_results(tmp_path):
    def launch(processes: int, out: Path):
        launcher = [sys.executable, "-m", "diffexit.app.cli"] if processes == 1 else [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", "diffexit.app.cli"]
        proc = subprocess.run([*launcher, "eval", "--tasks", "diffexit_trio", "--limit", "9", "--batch_size", "2",
                               "--model_args", SCHED, "--log_samples", "--output_path", str(out)],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    launch(1, tmp_path / "one")
    stdout = launch(2, tmp_path / "two")
    assert "9 requests" in stdout
    one, two = _samples(tmp_path / "one", "diffexit_trio"), _samples(tmp_path / "two", "diffexit_trio")
    # The scored answers; raw `resps` differ where lm-eval pads a process's requests with a copy of one of its own.
    assert [s["filtered_resps"] for s in two] == [s["filtered_resps"] for s in one]
    assert [[r["nfe"] for r in s["diffexit"]] for s in two] == [[r["nfe"] for r in s["diffexit"]] for s in one]
    assert _results(tmp_path / "two")["diffexit_trio"]["exact_match,none"] == \
        _results(tmp_path / "one")["diffexit_trio"]["exact_match,none"]


def test_apply_chat_template_without_a_template_is_a_one_line_error(tmp_path, capsys):
    code = eval_main(["--tasks", "diffexit_pick", "--limit", "1", "--apply_chat_template", "--output_path", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "has no chat template; drop --apply_chat_template" in err
