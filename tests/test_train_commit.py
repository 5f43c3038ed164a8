"""`diffexit train commit`: deterministic for a seed, resumable (also after a run killed mid-way), and the shipped
commit models load for their embedded models and keep calibration's bound on fresh held-out prompts."""

import pytest
import torch

from diffexit.app import train_commit
from diffexit.app.cli import main as cli
from diffexit.dllm import generate
from diffexit.dllm.calibrate import wilson
from diffexit.dllm.charlm.model import load_embedded_block_model, load_embedded_text_model
from diffexit.dllm.charlm.tasks import sample
from diffexit.dllm.charlm.tokenizer import decode_answer, encode_prompts
from diffexit.dllm.commit_rule import CommitModel, CommitRule

TINY = ["--tasks", "pick", "--n-train", "2", "--n-cal", "3", "--n-val", "2", "--risk", "0.3", "--fit-steps", "20"]


@pytest.fixture
def tiny_folder(tmp_path, tiny_text_model):
    model, tok = tiny_text_model(layers=1)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def _train(folder, out, work):
    return cli(["train", "commit", "--model", str(folder), "--out", str(out), "--work", str(work), *TINY])


def test_same_seed_and_arguments_give_the_same_file_fresh_or_resumed(tmp_path, tiny_folder):
    out, work = tmp_path / "commit_rule.safetensors", tmp_path / "work"
    assert _train(tiny_folder, out, work) == 0
    first = out.read_bytes()
    kept = sorted(p.name for p in work.iterdir())
    assert kept and not any(name.endswith(".tmp") for name in kept)
    # Resumed: every recording and scan decode is read back.
    out.unlink()
    assert _train(tiny_folder, out, work) == 0
    assert out.read_bytes() == first and sorted(p.name for p in work.iterdir()) == kept
    # From scratch: the same file again.
    for p in work.iterdir():
        p.unlink()
    out.unlink()
    assert _train(tiny_folder, out, work) == 0
    assert out.read_bytes() == first
    model = CommitModel.load(out)
    assert set(model.thresholds) == {"commit", "halt"} and model.record["risk"] == 0.3


def test_a_run_killed_mid_way_resumes_to_the_same_file(tmp_path, tiny_folder, monkeypatch):
    out, work = tmp_path / "commit_rule.safetensors", tmp_path / "work"
    assert _train(tiny_folder, tmp_path / "whole.safetensors", tmp_path / "whole") == 0
    real, calls = train_commit._commit_decode, []

    def killed_on_the_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed during the commit scan, after the recordings
        return real(*args)

    monkeypatch.setattr(train_commit, "_commit_decode", killed_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_folder, out, work)
    assert not out.exists() and any(work.iterdir())
    monkeypatch.setattr(train_commit, "_commit_decode", real)
    assert _train(tiny_folder, out, work) == 0
    # The record names the command, which names its own --out and --work: compare what the rule is made of.
    whole, resumed = CommitModel.load(tmp_path / "whole.safetensors"), CommitModel.load(out)
    assert resumed.thresholds == whole.thresholds and resumed.record["validation"] == whole.record["validation"]
    for (name, a), (_, b) in zip(whole.net.state_dict().items(), resumed.net.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("load", [load_embedded_text_model, load_embedded_block_model])
@pytest.mark.parametrize("mode", ["commit", "halt"])
def test_the_shipped_commit_models_load_beside_their_models(load, mode):
    model, tok = load()
    rule = CommitRule("learned", mode).bind(model, 4)
    assert 0 < rule.threshold <= 1 and rule.model.thresholds[mode]["4"] == rule.threshold


@pytest.mark.slow
@pytest.mark.parametrize("task", ["pick", "zip", "trio"])
def test_the_calibrated_commits_keep_the_bound_on_fresh_prompts(task):
    """On held-out draw 3 (neither calibration's 1 nor validation's 2), the share of answers the calibrated
    commits change is not significantly above the risk it was calibrated for (Wilson 95% lower bound)."""
    model, tok = load_embedded_text_model()
    examples = sample(task, "heldout", seed=3, n=64)
    ids, attn = encode_prompts(tok, [e.prompt for e in examples], 24)
    kw = dict(attention_mask=attn, gen_length=16, steps=16, block_length=4, mask_id=tok.mask_token_id)
    rule = CommitRule("learned", "commit")
    full, fast = generate(model, ids, **kw), generate(model, ids, halting=rule, **kw)
    changed = sum(decode_answer(tok, a) != decode_answer(tok, b) for a, b in zip(full.generated, fast.generated))
    assert wilson(changed, len(examples))[0] <= rule.model.record["risk"]
    assert fast.nfe.float().mean() < full.nfe.float().mean()
