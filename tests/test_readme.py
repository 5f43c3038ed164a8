"""Every code block of the README runs as written, with the hub models it names replaced by tiny local ones and the
batch sizes of its shell commands shrunk (the substitutions are listed below), so a snippet that rots fails here."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
SHELL = [code for lang, code in BLOCKS if lang == "bash"]

# Shell commands: the README's sizes are for a real run; these make each one a few seconds' worth of the same job.
SHRINK = [
    (r"--per-class \d+", "--per-class 1"),
    (r"--n \d+", "--n 2"),
    (r"--num_processes \d+", "--num_processes 2"),
    (r"(diffexit calibrate sched .*)", r"\1 --tasks add pick --n-cal 6 --n-val 2"),
    (r"(diffexit train uem .*)--steps \d+", r"\1--steps 2 --batch-size 4"),
    (r"(diffexit calibrate uem .*)--steps \d+", r"\1--steps 3 --samples 3 --held-out 3"),
]
# "Your own" DiT pipeline and images in the README: a tiny learned-sigma DiTPipeline and ImageFolder.
OWN_DIT = ("my-dit", "my-images")


def _shrink(line: str) -> str:
    for pattern, replacement in SHRINK:
        line = re.sub(pattern, replacement, line)
    return line


def test_the_first_block_sets_up_and_runs_what_ci_runs():
    lang, first = BLOCKS[0]
    commands = [line for line in first.splitlines() if line and not line.startswith("#")]
    assert lang == "bash" and len(commands) == 2
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set", "cd"))]
    # The test command is CI's, word for word; the main job starts with the same setup.
    assert commands[1] == " && ".join(ci)
    assert commands[0].startswith("bash scripts/setup.sh && ")


@pytest.fixture(scope="module")
def hub_stand_ins(tmp_path_factory, tiny_text_model):
    """Local folders for the hub models the README names: tiny random models of the same classes."""
    from transformers import DiffusionGemmaForBlockDiffusion, LlamaForCausalLM

    from diffexit.dllm.charlm.gemma import chat_tokenizer, gemma_config

    root = tmp_path_factory.mktemp("hub")
    model, tok = tiny_text_model(max_positions=512, cls=LlamaForCausalLM)
    for name in ("llada", "dream"):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    gemma_tok = chat_tokenizer()
    torch.manual_seed(0)
    gemma = DiffusionGemmaForBlockDiffusion(gemma_config(gemma_tok, hidden_size=32, num_heads=2, head_dim=16))
    gemma.save_pretrained(root / "gemma")
    gemma_tok.save_pretrained(root / "gemma")
    return {
        "GSAI-ML/LLaDA-8B-Instruct": str(root / "llada"), "Dream-org/Dream-v0-Instruct-7B": str(root / "dream"),
        "google/diffusiongemma-26B-A4B-it": str(root / "gemma"), "mask_id=126336": f"mask_id={tok.mask_token_id}",
        'device="cuda"': 'device="cpu"', "torch.bfloat16": "torch.float32", 'device_map="auto"': 'device_map="cpu"',
    }


# A line `print(...)  # what it prints` in a README block: the comment is the output the README promises.
PROMISED = re.compile(r"^\s*print\(.*\)\s*#\s*(.+?)\s*$", re.M)


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_block_runs(index, hub_stand_ins, tmp_path, monkeypatch, capsys):
    code = PYTHON[index]
    for name, local in hub_stand_ins.items():
        code = code.replace(name, local)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
    if code == PYTHON[index]:  # the embedded models, so the promised outputs hold (a stand-in's would not)
        printed = capsys.readouterr().out.splitlines()
        for promised in PROMISED.findall(code):
            assert promised in printed, f"README python block {index + 1} promises {promised!r}; printed {printed}"


def _commands(block: str) -> list[str]:
    lines = (line.strip() for line in block.splitlines())
    return [line.split(" # ")[0].strip() for line in lines
            if line and not line.startswith("#") and line.startswith(("diffexit ", "accelerate ", ".venv/bin/"))]


SHELL_BLOCKS = [_commands(block) for block in SHELL[1:] if _commands(block)]
# Commands that take minutes to hours as written (benchmarks, training, the demo's server): only their --help runs
# here; CI runs the benchmarks' quick mode in the first block's main job. Training heads on your own DiT runs
# (shrunk to 2 steps on the tiny one), since the lines after it read what it writes.
LONG = ("diffexit bench ", "diffexit train text", "diffexit train image", "diffexit demo",
        ".venv/bin/python benchmarks/")


def _argv(line: str) -> list[str]:
    python = str(Path(sys.executable))
    words = shlex.split(_shrink(line))
    if line.startswith(LONG):
        if words[0].startswith(".venv/bin/python"):
            return [python, str(ROOT / words[1]), "--help"]
        return [python, "-m", "diffexit.app.cli", *words[1:3], "--help"]
    if words[0] == "diffexit":
        return [python, "-m", "diffexit.app.cli", *words[1:]]
    if words[0] == "accelerate":
        return [python, "-m", "accelerate.commands.launch", *words[2:]]
    return words


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SHELL_BLOCKS)))
def test_shell_block_runs_line_by_line(index, tmp_path, learned_sigma_folders):
    # In order and in one folder, as a user pastes them: a later line may read what an earlier one wrote.
    if any(name in line for line in SHELL_BLOCKS[index] for name in OWN_DIT):
        learned_sigma_folders(tmp_path / "stand-in")
        (tmp_path / "stand-in" / "pipe").rename(tmp_path / "my-dit")
        (tmp_path / "stand-in" / "images").rename(tmp_path / "my-images")
    for line in SHELL_BLOCKS[index]:
        proc = subprocess.run(_argv(line), cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (line, proc.stderr[-3000:])
