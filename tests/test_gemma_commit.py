"""The learned rule as a DiffusionGemma stopping criterion (diffexit.dllm.gemma_commit) and its trainer."""

import dataclasses

import pytest
import torch

from diffexit.app.cli import main as cli

STEPS = 4


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    from transformers import DiffusionGemmaForBlockDiffusion

    from diffexit.dllm.charlm.gemma import chat_tokenizer, gemma_config

    folder = tmp_path_factory.mktemp("gemma")
    tok = chat_tokenizer()
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(gemma_config(tok, hidden_size=32, num_heads=2, head_dim=16))
    with torch.no_grad():
        # Sure of two tokens only ('N' or 'O', by the sign of one hidden unit): canvases settle at different steps.
        norm = model.model.encoder.language_model.norm.weight
        norm.zero_()
        norm[0] = 1.0
        head = model.lm_head.weight  # tied with the embeddings
        head[:, 0] = 0.0
        head[tok.convert_tokens_to_ids("N"), 0], head[tok.convert_tokens_to_ids("O"), 0] = 20.0, -20.0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(gemma_dir):
    """The tiny model, its tokenizer, prompts of two canvases, their all-steps recording and a rule fitted on it."""
    from diffexit.dllm.charlm.gemma import load_gemma_model
    from diffexit.dllm.charlm.tokenizer import encode_prompts
    from diffexit.dllm.commit_rule import CommitModel, weights_digest
    from diffexit.dllm.commit_training import fit
    from diffexit.dllm.gemma_commit import GEMMA_FEATURES, record

    model, tok = load_gemma_model(gemma_dir)
    prompts = ["add:1+2=", "rev:abc", "pick:ab,cd", "zip:ab,cd", "add:9+9=", "rev:xyz"]
    ids, mask = encode_prompts(tok, prompts, 12)
    kw = dict(max_new_tokens=model.config.canvas_length, steps=STEPS)
    rec = record(model, ids, mask, seeds=range(len(ids)), eos_token_ids=(tok.eos_token_id, tok.pad_token_id), **kw)
    net, _ = fit(*rec.examples(), seed=0, steps=50)
    commit_model = CommitModel(net, model.config.get_text_config().vocab_size, (model.config.canvas_length,),
                               weights_digest(model), (tok.eos_token_id, tok.pad_token_id), {"halt": {"16": 0.5}},
                               {"denoising_steps": STEPS}, GEMMA_FEATURES)
    return model, tok, ids, mask, rec, commit_model


def _decode(model, ids, mask, rule, seeds):
    from diffexit.dllm.gemma_loop import decode

    kw = {"stopping": rule} if rule is not None else {"confidence_threshold": None}
    return decode(model, ids, attention_mask=mask, seeds=list(seeds), max_new_tokens=model.config.canvas_length,
                  max_denoising_steps=STEPS, **kw)


def _spread_threshold(rec, net):
    """A threshold at which the recorded samples would stop at different steps, some before the last."""
    from diffexit.dllm.gemma_commit import halted

    scan = [0.999, 0.99, 0.95, 0.9, 0.8, 0.7, 0.5, 0.3, 0.1]
    _, passes = halted(rec, net, scan)
    for t, p in zip(scan, passes):
        if len(set(p.tolist())) > 1 and p.min() < STEPS:
            return t
    pytest.fail(f"no threshold spreads the stops: {passes.tolist()}")


def test_threshold_one_never_stops_and_equals_all_steps(setup):
    from diffexit.dllm.gemma_commit import LearnedStopping

    model, _, ids, mask, _, commit_model = setup
    full = _decode(model, ids, mask, None, range(len(ids)))
    never = _decode(model, ids, mask, LearnedStopping(commit_model, threshold=1.0), range(len(ids)))
    assert torch.equal(never.sequences, full.sequences) and torch.equal(never.passes, full.passes)
    assert full.passes.tolist() == [STEPS] * len(ids)


def test_the_compacting_loop_decides_as_each_sample_alone_and_as_the_recording_predicts(setup):
    from diffexit.dllm.gemma_commit import LearnedStopping, halted

    model, _, ids, mask, rec, commit_model = setup
    t = _spread_threshold(rec, commit_model.net)
    batch = _decode(model, ids, mask, LearnedStopping(commit_model, threshold=t), range(len(ids)))
    assert len(set(batch.passes.tolist())) > 1 and batch.passes.min() < STEPS  # samples leave the batch
    for j in range(len(ids)):
        alone = _decode(model, ids[j:j + 1], mask[j:j + 1], LearnedStopping(commit_model, threshold=t), [j])
        assert torch.equal(alone.sequences[0], batch.sequences[j]) and alone.passes[0] == batch.passes[j]
    # One canvas: halted() replays the decode exactly from the all-steps recording.
    changed, passes = halted(rec, commit_model.net, [t])
    assert passes[0].tolist() == batch.passes.float().tolist()
    prompt = ids.shape[1]
    full = rec.generated
    for j in range(len(ids)):
        ours = batch.sequences[j, prompt:]
        eos = (full[j] == rec.eos_token_id).nonzero()
        upto = int(eos[0]) + 1 if len(eos) else full.shape[1]
        assert bool(changed[0, j]) == (not torch.equal(ours[:upto], full[j, :upto]))


def test_enabled_on_the_model_transformers_generate_stops_where_the_compacting_loop_does(setup):
    from diffexit.dllm.diffusion_gemma import CanvasSeeds, decoder_forward_passes, sched_enabled
    from diffexit.dllm.gemma_commit import LearnedStopping

    model, tok, ids, mask, rec, commit_model = setup
    t = _spread_threshold(rec, commit_model.net)
    batch = _decode(model, ids, mask, LearnedStopping(commit_model, threshold=t), range(len(ids)))
    for j in range(len(ids)):
        # transformers' own loop, one sample (its stopped samples stay in the batch), seeded as the loop seeds it.
        with sched_enabled(model, LearnedStopping(commit_model, threshold=t)):
            out = model.generate(ids[j:j + 1], attention_mask=mask[j:j + 1], return_dict_in_generate=True,
                                 max_new_tokens=model.config.canvas_length, max_denoising_steps=STEPS,
                                 streamer=CanvasSeeds(j))
        assert torch.equal(out.sequences[0], batch.sequences[j])
        assert decoder_forward_passes(out, ids.shape[1], tok.pad_token_id).item() == batch.passes[j]
    with pytest.raises(ValueError, match="weights.*diffexit train commit --model"):
        with sched_enabled(model, LearnedStopping(dataclasses.replace(commit_model, lm_digest="0" * 16))):
            pass
    assert "generate" not in vars(model)  # refused before anything was replaced


def test_the_pipeline_swap_in_takes_the_learned_rule(setup):
    from diffusers import BlockRefinementScheduler

    from diffexit.dllm.gemma_commit import LearnedStopping
    from diffexit.samplers.diffusion_gemma_pipeline import SchEDDiffusionGemmaPipeline

    model, tok, _, _, rec, commit_model = setup
    pipe = SchEDDiffusionGemmaPipeline(model=model, scheduler=BlockRefinementScheduler(), processor=tok)
    pipe.set_progress_bar_config(disable=True)

    def run(**kwargs):
        out = pipe(prompt=["rev:abc", "rev:xyz", "add:1+2"], gen_length=model.config.canvas_length,
                   num_inference_steps=STEPS, eos_early_stop=False, output_type="seq",
                   generator=torch.Generator().manual_seed(0), **kwargs)
        return out.sequences, pipe.decoder_passes.clone()

    every, every_passes = run(confidence_threshold=None)
    never, never_passes = run(stopping=LearnedStopping(commit_model, threshold=1.0))
    assert torch.equal(never, every) and torch.equal(never_passes, every_passes)
    _, passes = run(stopping=LearnedStopping(commit_model, threshold=1e-6))  # clears at once: one pass each
    assert passes.tolist() == [1, 1, 1] and every_passes.tolist() == [STEPS] * 3
    with pytest.raises(ValueError, match="weights.*diffexit train commit --model"):
        run(stopping=LearnedStopping(dataclasses.replace(commit_model, lm_digest="0" * 16)))


def test_a_rule_for_another_model_is_refused_with_the_fix(setup):
    from diffexit.dllm.commit_rule import FEATURES, CommitRule
    from diffexit.dllm.gemma_commit import LearnedStopping

    model, _, ids, mask, _, commit_model = setup
    for change, says in (({"lm_digest": "0" * 16}, "weights"), ({"vocab_size": 7}, "vocabulary of 7"),
                         ({"block_lengths": (8,)}, "canvases of \\[8\\]"), ({"features": FEATURES}, "masked loops")):
        other = dataclasses.replace(commit_model, **change)
        with pytest.raises(ValueError, match=f"{says}.*diffexit train commit --model"):
            _decode(model, ids, mask, LearnedStopping(other), range(len(ids)))
    with pytest.raises(ValueError, match="DiffusionGemma rule.*LearnedStopping"):
        CommitRule(commit_model, "halt").bind(model, 16)
    with pytest.raises(ValueError, match="calibrated threshold 0.5 holds at 4 denoising steps.*runs 8"):
        LearnedStopping(commit_model).bind(model).begin(8)
    with pytest.raises(ValueError, match="probability in \\(0, 1\\]"):
        LearnedStopping(commit_model, threshold=1.5)


def test_the_shipped_rule_loads_and_is_calibrated():
    from diffexit.dllm.charlm.gemma import load_embedded_gemma_model
    from diffexit.dllm.gemma_commit import LearnedStopping

    model, _ = load_embedded_gemma_model()
    rule = LearnedStopping().bind(model)
    assert 0 < rule.threshold < 1 and rule.model.record["denoising_steps"] == 16
    assert rule.model.record["validation"]["16"]["halt"]["changed"] <= 1


def test_training_is_deterministic_and_resumable(gemma_dir, tmp_path, capsys):
    out = tmp_path / "rule" / "commit_rule.safetensors"
    out.parent.mkdir()
    args = ["train", "commit", "--model", str(gemma_dir), "--out", str(out), "--tasks", "pick", "--n-train", "4",
            "--n-cal", "4", "--n-val", "2", "--risk", "0.3", "--fit-steps", "20", "--steps", str(STEPS)]
    assert cli(args) == 0
    first, card = out.read_bytes(), out.with_name("COMMIT_CARD.md").read_text()
    assert "no commit mode" in card and "| pick | 2 |" in card
    assert cli(args) == 0  # resumed from OUT.work
    assert out.read_bytes() == first
    import shutil

    shutil.rmtree(out.with_name(out.name + ".work"))
    out.unlink()
    assert cli(args) == 0  # from scratch
    assert out.read_bytes() == first
    too_few = [a if a != "0.3" else "0.1" for a in args]  # 4 calibration prompts certify no risk under 1/5
    with pytest.raises(SystemExit):
        cli(too_few)
    assert "needs at least 9 calibration prompts" in capsys.readouterr().err


def test_bench_gemma_has_a_learned_row_where_the_model_ships_a_rule(setup, gemma_dir, tmp_path, capsys):
    import json
    import shutil

    from diffexit.app.bench.gemma import ORACLE

    _, _, _, _, _, commit_model = setup
    folder = tmp_path / "model"
    shutil.copytree(gemma_dir, folder)
    commit_model.save(folder / "commit_rule.safetensors")
    out = tmp_path / "bench"
    assert cli(["bench", "gemma", "--quick", "--n", "2", "--batch", "2", "--steps", str(STEPS), "--tasks", "pick",
                "--model", str(folder), "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"] if r["task"] == "pick"}
    learned = rows["learned-halt"]
    assert learned["family"] == "learned" and learned["params"]["threshold"] == 0.5
    assert 1 <= learned["nfe"] <= STEPS
    if learned["agreement"] == 1.0:  # no rule that keeps every answer stops before the oracle
        assert rows[ORACLE]["nfe"] <= learned["nfe"]
    # Calibrated at other steps: the row is left out, and said so; a rule for other weights is refused.
    assert cli(["bench", "gemma", "--quick", "--n", "2", "--batch", "2", "--steps", "3", "--tasks", "pick",
                "--model", str(folder), "--out", str(tmp_path / "b3")]) == 0
    assert "learned-halt left out" in capsys.readouterr().err
    dataclasses.replace(commit_model, lm_digest="0" * 16).save(folder / "commit_rule.safetensors")
    assert cli(["bench", "gemma", "--quick", "--n", "2", "--batch", "2", "--steps", str(STEPS), "--tasks", "pick",
                "--model", str(folder), "--out", str(tmp_path / "b4")]) == 1
    assert "trained for weights 0000000000000000" in capsys.readouterr().err
