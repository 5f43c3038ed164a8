"""The embedded tasks in DiffusionGemma's format: layout, the training forward against what generate's denoiser
sees, decoding, and training (``diffexit train text --arch diffusion-gemma``)."""

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from diffexit.dllm.charlm import train as train_mod
from diffexit.dllm.charlm.gemma import (CANVAS_LENGTH, chat_tokenizer, gemma_config, gemma_decode, gemma_span,
                                        new_gemma_model)
from diffexit.dllm.charlm.gemma_objective import denoiser_logits, gemma_batch, gemma_training_loss
from diffexit.dllm.charlm.tasks import LAYOUTS, sample


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


def tiny(tok, seed=0):
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    return DiffusionGemmaForBlockDiffusion(gemma_config(tok, hidden_size=32, num_heads=2, head_dim=16)).eval()


def test_spans_are_whole_canvases_and_the_chat_template_passes_prompts_through(tok):
    assert gemma_span(LAYOUTS["short"], CANVAS_LENGTH) == 16 and gemma_span(LAYOUTS["long"], CANVAS_LENGTH) == 144
    ids = tok.apply_chat_template([{"role": "user", "content": "rev:abc"}], tokenize=True, return_dict=True)
    assert tok.decode(ids["input_ids"]) == "rev:abc"


def test_every_layer_attends_with_the_small_head_and_full_rope_and_keeps_it_through_save_and_load(tok, tmp_path):
    from transformers import DiffusionGemmaForBlockDiffusion

    tiny(tok).save_pretrained(tmp_path)
    reloaded = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path)
    text = reloaded.config.text_config
    assert text.layer_types == ["sliding_attention", "full_attention"]  # Gemma's rule: the last layer is global
    assert [text.per_layer_config[i].head_dim for i in range(2)] == [16, 16]  # not Gemma's 512-wide global head
    assert all(p == {"rope_type": "default", "rope_theta": 10_000.0} for p in text.rope_parameters.values())
    assert text.sliding_window >= 512  # the window spans every sequence, so the sliding layer attends to all of it
    q_proj = reloaded.model.decoder.layers[1].self_attn.q_proj
    assert q_proj.out_features == 2 * 16


def test_a_new_model_starts_with_unit_variance_attention_logits(tok):
    # Gemma's attention does not divide by sqrt(head_dim); the trainer's model starts its query and key norms small
    # enough that random logits have unit variance, as in standard attention.
    head_dim = 32
    config = gemma_config(tok, hidden_size=64, num_heads=2, head_dim=head_dim)
    torch.manual_seed(0)
    model = new_gemma_model(config)
    norms = {n: m.weight for n, m in model.named_modules() if n.endswith(("self_attn.q_norm", "self_attn.k_norm"))
             and "vision" not in n}
    assert len(norms) == 2 * 2 * config.text_config.num_hidden_layers  # encoder and decoder, queries and keys
    assert all(torch.all(w == head_dim ** -0.25) for w in norms.values())
    attn = model.model.decoder.layers[0].self_attn
    hidden = model.model.decoder.layers[0].input_layernorm(torch.randn(1, 512, 64))
    q = attn.q_norm(attn.q_proj(hidden).view(1, 512, -1, head_dim))
    k = attn.k_norm(attn.k_proj(hidden).view(1, 512, -1, head_dim))
    logits = torch.einsum("bqhd,bkd->bhqk", q, k[:, :, 0])  # one key-value head
    assert 0.7 < logits.std().item() < 1.4
    # Everything else is transformers' own initialization.
    torch.manual_seed(0)
    from transformers import DiffusionGemmaForBlockDiffusion

    stock = DiffusionGemmaForBlockDiffusion(config)
    theirs = dict(stock.named_parameters())
    for name, p in model.named_parameters():
        if name[: -len(".weight")] not in norms:
            assert torch.equal(p, theirs[name]), name


def test_a_later_canvas_sees_the_clean_answer_before_it(tok):
    examples = sample("chain", "train", 0, 2)
    ids, mask, target = gemma_batch(tok, examples, LAYOUTS["long"], 3, CANVAS_LENGTH)
    assert ids.shape == (2, 24 + 48) and mask[:, 24:].all() and target.shape == (2, 16)
    assert tok.decode(ids[0, 24:]) == examples[0].answer[:48]
    assert tok.decode(target[0]) == examples[0].answer[48:64]


def test_the_training_forward_is_what_generates_denoiser_sees(tok):
    # The first denoising step of generate, from a given canvas and no self-conditioning, against one training
    # forward over the same prompt and canvas: the positions, masks and left padding must agree.
    model = tiny(tok)
    examples = sample("reverse", "heldout", 0, 3)
    ids, mask, _ = gemma_batch(tok, examples, LAYOUTS["short"], 0, CANVAS_LENGTH)
    canvas = torch.randint(4, 90, (3, CANVAS_LENGTH), generator=torch.Generator().manual_seed(0))
    seen = []
    original = model.forward

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        if kwargs.get("decoder_input_ids") is not None and not seen:
            seen.append(out.logits)
        return out

    model.forward = recording
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, decoder_input_ids=canvas, max_new_tokens=16, max_denoising_steps=2,
                       confidence_threshold=None)
        direct = denoiser_logits(model, ids, mask, canvas)
    torch.testing.assert_close(direct, seen[0], rtol=1e-5, atol=1e-5)


def test_decoding_returns_answers_and_the_models_pass_counts(tok):
    model = tiny(tok)
    prompts = [e.prompt for e in sample("chain", "heldout", 0, 2)]
    answers, passes = gemma_decode(model, tok, prompts, LAYOUTS["long"], 3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    # Nine canvases of three steps, unless an EOS ended a sequence early.
    assert passes.shape == (2,) and (passes <= 27).all() and (passes >= 3).all()
    again, again_passes = gemma_decode(model, tok, prompts, LAYOUTS["long"], 3)  # seeded
    assert again == answers and torch.equal(again_passes, passes)


def test_the_loss_is_deterministic_per_step_and_self_conditions_half_the_batch(tok, monkeypatch):
    model = tiny(tok)
    args = argparse.Namespace(seed=0, batch_short=16, batch_long=2)
    with torch.no_grad():
        a, b = gemma_training_loss(model, tok, 5, args, 0), gemma_training_loss(model, tok, 5, args, 0)
        c = gemma_training_loss(model, tok, 6, args, 0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    masks = []
    real = denoiser_logits

    def spy(model, ids, mask, canvas, logits=None, sc_mask=None):
        masks.append(sc_mask)
        return real(model, ids, mask, canvas, logits, sc_mask)

    import diffexit.dllm.charlm.gemma_objective as objective

    monkeypatch.setattr(objective, "denoiser_logits", spy)
    with torch.no_grad():
        gemma_training_loss(model, tok, 5, args, 0)
    chosen = [m for m in masks if m is not None]
    assert chosen and 0 < sum(int(m.sum()) for m in chosen) < sum(m.numel() for m in chosen)


TINY_GEMMA = ["--arch", "diffusion-gemma", "--hidden", "32", "--layers", "2", "--heads", "2", "--batch-short", "16",
              "--batch-long", "2", "--decode-every", "0", "--checkpoint-every", "3", "--warmup", "2", "--lr", "3e-3",
              "--threads", "1"]


@pytest.mark.slow
def test_gemma_training_lowers_the_loss_and_resumes_exactly(tmp_path, tok, monkeypatch, caplog):
    import diffexit.dllm.charlm.gemma_objective as objective
    from transformers import DiffusionGemmaForBlockDiffusion

    args = argparse.Namespace(seed=0, batch_short=24, batch_long=2)
    config = gemma_config(tok, hidden_size=32, num_heads=2, head_dim=16, max_positions=168)  # as the trainer does

    def fixed_loss(state=None):
        torch.manual_seed(0)
        model = DiffusionGemmaForBlockDiffusion(config).eval()
        if state is not None:
            # The checkpoint keeps one copy of the weights the encoder and decoder share.
            missing, unexpected = model.load_state_dict(state, strict=False)
            assert not unexpected and all(k.startswith(("model.decoder.", "lm_head.")) for k in missing)
        with torch.no_grad():
            return gemma_training_loss(model, tok, 10 ** 6, args, 0).item()

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train_mod.main(["--out", str(straight), "--steps", "12", *TINY_GEMMA])
    trained = load_file(straight / "checkpoint" / "model.safetensors")
    assert fixed_loss(trained) < 0.9 * fixed_loss()

    original = objective.gemma_training_loss

    def interrupted(model, tokenizer, step, a, rank):
        if step == 4:
            raise KeyboardInterrupt  # after the checkpoint at step 3
        return original(model, tokenizer, step, a, rank)

    monkeypatch.setattr(objective, "gemma_training_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_mod.main(["--out", str(broken), "--steps", "12", *TINY_GEMMA])
    monkeypatch.setattr(objective, "gemma_training_loss", original)
    assert json.loads((broken / "checkpoint" / "state.json").read_text())["step"] == 3
    train_mod.main(["--out", str(broken), "--resume", "--steps", "12", *TINY_GEMMA])
    resumed = load_file(broken / "checkpoint" / "model.safetensors")
    assert trained.keys() == resumed.keys() and all(torch.equal(trained[k], resumed[k]) for k in trained)
    assert "Removed shared tensor" not in caplog.text  # the aliases, named at every checkpoint, are expected


def test_canvas_seeds_keep_later_canvases_noise_when_an_earlier_canvas_stops(tok, monkeypatch):
    # A rule that stops every sample after one step of the first canvas: that canvas skips the draws of three steps.
    # With CanvasSeeds the second canvas still starts from the noise a decode with every step starts it from.
    from transformers.models.diffusion_gemma import generation_diffusion_gemma as gen

    from diffexit.dllm.charlm.tokenizer import encode_prompts
    from diffexit.dllm.diffusion_gemma import CanvasSeeds

    class FirstCanvasOneStep(gen.DiffusionGemmaAdaptiveStopping):
        def __init__(self, stop):
            self.stop, self.canvas = stop, -1

        def reset(self):
            self.canvas += 1

        def __call__(self, argmax_canvas, logits, **kwargs):
            return torch.full((logits.shape[0],), self.stop and self.canvas == 0)

    draws = []
    original = gen.EntropyBoundSampler.initialize_canvas
    monkeypatch.setattr(gen.EntropyBoundSampler, "initialize_canvas",
                        lambda self, *a, **k: draws.append(original(self, *a, **k)) or draws[-1])
    model = tiny(tok)
    ids, mask = encode_prompts(tok, [e.prompt for e in sample("chain", "heldout", 0, 2)], 24)

    def second_canvas_start(stop, seeds):
        draws.clear()
        model._prepare_diffusion_stopping_criteria = lambda config: FirstCanvasOneStep(stop)
        try:
            torch.manual_seed(0)
            model.generate(ids, attention_mask=mask, max_new_tokens=32, max_denoising_steps=4,
                           streamer=CanvasSeeds(7) if seeds else None)
        finally:
            del model._prepare_diffusion_stopping_criteria
        # Each step renoises with a fresh draw; a canvas starts with one: 1 + 4 draws, or 1 + 1 when stopped.
        return draws[2 if stop else 5]

    assert torch.equal(second_canvas_start(False, True), second_canvas_start(True, True))
    assert not torch.equal(second_canvas_start(False, False), second_canvas_start(True, False))


# the shipped model ----------------------------------------------------------------------------------------------

def test_shipped_model_loads_offline_and_solves_held_out_examples_at_full_steps(monkeypatch):
    from diffexit.dllm.charlm.gemma import load_embedded_gemma_model
    from diffexit.dllm.charlm.tasks import TASK_NAMES, layout_of, score

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_embedded_gemma_model()
    assert sum(p.numel() for p in model.parameters()) * 2 < 10e6  # fp16 on disk, under ~10 MB
    for task in TASK_NAMES:
        examples = sample(task, "heldout", 0, 3)
        runs = [gemma_decode(model, tok, [e.prompt for e in examples], layout_of(task), CANVAS_LENGTH)
                for _ in range(2)]
        assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
        assert all(score(task, e.prompt, a) for e, a in zip(examples, runs[0][0])), (task, runs[0][0])


def test_shipped_model_needs_its_steps_on_the_tasks_that_choose():
    """One denoising step per canvas gets (almost) none of pick, zip or trio right, which full steps solve (above);
    on the controls one step is enough (MODEL_CARD.md)."""
    from diffexit.dllm.charlm.gemma import load_embedded_gemma_model
    from diffexit.dllm.charlm.tasks import CONTROLS, layout_of, score

    model, tok = load_embedded_gemma_model()
    for task in ("pick", "zip", "trio", *CONTROLS):
        examples = sample(task, "heldout", 0, 8)
        answers, passes = gemma_decode(model, tok, [e.prompt for e in examples], layout_of(task), 1)
        assert passes.tolist() == [1] * 8
        right = sum(score(task, e.prompt, a) for e, a in zip(examples, answers))
        if task in CONTROLS:
            assert right >= 6, (task, right)
        else:
            assert right <= 1, (task, right)


def test_shipped_model_runs_in_the_diffusers_pipeline():
    """The issue asks that the model run in DiffusionGemmaPipeline; the stock one's ``__call__`` raises TypeError on
    this transformers (tests/test_diffusion_gemma.py), so through the swap-in, with its stock rule and with SchED."""
    from diffusers import BlockRefinementScheduler

    from diffexit.dllm.charlm.gemma import load_embedded_gemma_model
    from diffexit.dllm.charlm.tasks import score
    from diffexit.dllm.diffusion_gemma import SchEDStopping
    from diffexit.samplers import ThresholdSchedule
    from diffexit.samplers.diffusion_gemma_pipeline import SchEDDiffusionGemmaPipeline

    model, tok = load_embedded_gemma_model()
    pipe = SchEDDiffusionGemmaPipeline(model=model, scheduler=BlockRefinementScheduler(), processor=tok)
    pipe.set_progress_bar_config(disable=True)
    for task in ("add", "zip"):
        examples = sample(task, "heldout", 0, 4)
        for stopping in (None, SchEDStopping(ThresholdSchedule("cosine", 8.0, 3.0), stat="min")):
            out = pipe(prompt=[e.prompt for e in examples], gen_length=CANVAS_LENGTH, num_inference_steps=16,
                       generator=torch.Generator().manual_seed(0), stopping=stopping)
            assert all(score(task, e.prompt, t) for e, t in zip(examples, out.texts)), (task, stopping, out.texts)
            assert pipe.decoder_passes.max() <= 16
