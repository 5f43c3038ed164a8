"""The embedded text model: tokenizer, tasks and scorers, the bidirectional model, training, and shipped weights."""

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerFast

from diffexit.dllm import generate
from diffexit.dllm.charlm import train as train_mod
from diffexit.dllm.charlm.data import SHORT_TASKS, TASK_SHARES, split_counts, step_examples
from diffexit.dllm.charlm.objective import corrupt, training_loss
from diffexit.dllm.charlm.tasks import (
    CONTROLS, DECODE, LAYOUTS, TASK_NAMES, TASKS, layout_of, sample, score, split_of,
)
from diffexit.dllm.charlm.model import (
    DiffusionLlama, load_embedded_text_model, load_text_model, text_model_config,
)
from diffexit.dllm.charlm.tokenizer import (
    EOS, MASK, PAD, UNK, build_tokenizer, decode_answer, encode_answers, encode_prompts,
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def tiny_model(tok, seed=0, max_positions=64):
    torch.manual_seed(seed)
    cfg = text_model_config(len(tok), tok.pad_token_id, hidden_size=32, num_layers=2, num_heads=4,
                            max_positions=max_positions)
    return DiffusionLlama(cfg).eval()


# tokenizer ------------------------------------------------------------------------------------------------------

def test_tokenizer_special_tokens_and_round_trip(tok, tmp_path):
    assert (tok.pad_token, tok.eos_token, tok.mask_token, tok.unk_token) == (PAD, EOS, MASK, UNK)
    assert len({tok.pad_token_id, tok.eos_token_id, tok.mask_token_id, tok.unk_token_id}) == 4
    text = f"add:012+9 x{MASK}y{EOS}{PAD}~ !"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.mask_token_id) == 1 and ids.count(tok.eos_token_id) == 1
    # Each special token is one id, and so is every other character.
    assert len(ids) == len(text) - sum(len(t) - 1 for t in (MASK, EOS, PAD))
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "add:012+9 xy~ !"
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    again = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert again.mask_token_id == tok.mask_token_id and again(text, add_special_tokens=False)["input_ids"] == ids


def test_tokenizer_maps_unknown_characters_to_unk(tok):
    assert tok("é", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_encoding_a_prompt_with_unknown_characters_warns(tok):
    import warnings
    with pytest.warns(UserWarning, match="outside the model's printable-ASCII vocabulary .*'éü'"):
        encode_prompts(tok, ["rev:é", "rev:ü"], 24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_prompts(tok, ["rev:abc"], 24)


def test_encode_prompts_left_pads(tok):
    ids, mask = encode_prompts(tok, ["ab", "wxyz"], 5)
    assert ids.shape == mask.shape == (2, 5) and ids.dtype == torch.long
    assert mask.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]]
    assert ids[0, :3].tolist() == [tok.pad_token_id] * 3
    assert tok.decode(ids[1, 1:]) == "wxyz"
    with pytest.raises(ValueError, match="longer than prompt_length"):
        encode_prompts(tok, ["abcdef"], 5)


def test_encode_answers_pads_with_eos_and_decode_stops_there(tok):
    span = encode_answers(tok, ["abc", ""], 6)
    assert span[0, 3:].tolist() == [tok.eos_token_id] * 3 and span[1].tolist() == [tok.eos_token_id] * 6
    assert decode_answer(tok, span[0]) == "abc" and decode_answer(tok, span[1]) == ""
    with pytest.raises(ValueError, match="EOS"):
        encode_answers(tok, ["abcdef"], 6)


def test_decode_answer_keeps_leftover_masks_visible(tok):
    ids = tok(f"ab{MASK}c", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert decode_answer(tok, torch.tensor(ids)) == f"ab{MASK}c"
    assert not score("reverse", "rev:cxba", decode_answer(tok, torch.tensor(ids)))


# tasks ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", TASK_NAMES)
def test_sample_is_a_pure_function_of_its_seed(task):
    a, b = sample(task, "train", 7, 20), sample(task, "train", 7, 20)
    assert a == b
    assert sample(task, "train", 7, 5) == a[:5]
    assert [e.prompt for e in sample(task, "train", 8, 20)] != [e.prompt for e in a]


@pytest.mark.parametrize("task", TASK_NAMES)
def test_splits_are_disjoint_and_examples_fit_the_layout(task, tok):
    layout = layout_of(task)
    for split in ("train", "heldout"):
        examples = sample(task, split, 0, 50)
        assert all(split_of(task, e.prompt) == split for e in examples)
        assert all(score(task, e.prompt, e.answer) for e in examples)
        encode_prompts(tok, [e.prompt for e in examples], layout.prompt_length)
        encode_answers(tok, [e.answer for e in examples], layout.span_length)


def test_chain_answer_is_long_form():
    examples = sample("chain", "train", 0, 20)
    assert all(len(e.answer) == 129 for e in examples)
    assert LAYOUTS["long"].span_length > 129  # room for at least one [EOS]
    words = examples[0].prompt[len("chain:"):].split(",")
    assert score("chain", examples[0].prompt, " ".join([words[0]] * 26))
    assert not score("chain", examples[0].prompt, " ".join([words[0]] * 25))


def test_controls_are_the_tasks_with_one_right_answer():
    assert CONTROLS == tuple(t for t in TASK_NAMES if not TASKS[t].coupled) == ("reverse", "add")


def test_every_layout_decodes_one_token_per_step_in_whole_blocks():
    for layout in LAYOUTS.values():
        block, steps = DECODE[layout.span_length]
        assert steps == layout.span_length and layout.span_length % block == 0


def test_sample_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        sample("mul", "train", 0, 1)
    with pytest.raises(ValueError, match="unknown split"):
        sample("add", "test", 0, 1)
    with pytest.raises(ValueError, match="malformed"):
        score("add", "add:12+34", "46")
    with pytest.raises(ValueError, match="task tag"):
        score("pick", "rev:abc", "cba")


CHAIN_AB = " ".join(["cjbe", "ouyx"] * 13)
SCORER_CASES = {
    "add": ("add:000123+004567", ["0004690"], ["4690", "0004691", "00004690", " 0004690"]),
    "reverse": ("rev:kbtqzea", ["aezqtbk"], ["kbtqzea", "aezqtb", "aezqtbk "]),
    "pick": ("pick:ceah,jlon,wxrq", ["ceah", "jlon", "wxrq"], ["jlo", "jlonw", "ceaj", "", "JLON", "jlon ", "ceah,jlon"]),
    "zip": ("zip:cjbe,ouyx", ["cojubyex", "ocujybxe"], ["cjbeouyx", "cojubye", "cojuybex", "cojubyexx", "ocujybex"]),
    "trio": ("trio:cjb,rou", ["rou-cjb-rou", "cjb-cjb-cjb", "rou-rou-rou"],
             ["rou-cjb", "rou-cjb-rou-cjb", "roucjbrou", "rou-cjb-ruo", "rou-cjb-rou-", "rou cjb rou"]),
    "chain": ("chain:cjbe,ouyx", [CHAIN_AB, " ".join(["ouyx"] * 26)],
              [CHAIN_AB + " ", " ".join(["cjbe", "ouyx"] * 12 + ["cjbe"]), CHAIN_AB + " cjbe",
               CHAIN_AB.replace("ouyx", "ouxy", 1), CHAIN_AB.replace(" ", "-")]),
}


@pytest.mark.parametrize("task", TASK_NAMES)
def test_scorer_accepts_every_valid_answer_and_nothing_else(task):
    prompt, valid, invalid = SCORER_CASES[task]
    for output in valid:
        assert score(task, prompt, output), output
    for output in invalid:
        assert not score(task, prompt, output), output


# Which of the valid answers the generator drew, as (index, number of choices): the word picked; which word was
# interleaved first; which word comes first and which last.
CHOICE = {
    "pick": lambda p, a: (p[5:].split(",").index(a), 3),
    "zip": lambda p, a: (int(a[0] != p[4]), 2),
    "trio": lambda p, a: (p[5:].split(",").index(a.split("-")[0]) * 2 + p[5:].split(",").index(a.split("-")[-1]), 4),
    "chain": lambda p, a: (p[6:].split(",").index(a.split(" ")[0]) * 2 + p[6:].split(",").index(a.split(" ")[-1]), 4),
}


@pytest.mark.parametrize("task", [t for t in TASK_NAMES if TASKS[t].coupled])
def test_coupled_tasks_train_on_answers_spread_over_the_valid_ones(task):
    # If the generator favoured one valid answer (say the first word), the model would learn it and one-step
    # decoding would have a single answer to copy: the task would measure nothing.
    draws = [CHOICE[task](e.prompt, e.answer) for e in sample(task, "train", 0, 800)]
    k = draws[0][1]
    shares = [sum(i == c for i, _ in draws) / len(draws) for c in range(k)]
    assert min(shares) > 0.7 / k, shares


def test_choices_come_from_disjoint_alphabets():
    # Once one letter of a choice is committed it tells which word is being written, so the rest is a copy.
    for task, tag in (("pick", "pick:"), ("zip", "zip:"), ("trio", "trio:"), ("chain", "chain:")):
        for e in sample(task, "train", 1, 50):
            words = e.prompt[len(tag):].split(",")
            assert all(len(set(w)) == len(w) for w in words)
            assert all(not set(a) & set(b) for i, a in enumerate(words) for b in words[i + 1:]), e.prompt


# model ----------------------------------------------------------------------------------------------------------

def test_model_is_bidirectional(tok):
    model = tiny_model(tok)
    x = torch.randint(4, len(tok), (2, 12))
    later = x.clone()
    later[:, -1] = (x[:, -1] - 3) % (len(tok) - 4) + 4
    with torch.no_grad():
        a, b = model(x).logits, model(later).logits
    assert a.shape == (2, 12, len(tok))
    # A change at the last position reaches the first: no causal mask anywhere.
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4


def test_model_uses_absolute_positions(tok):
    # Equal tokens at different positions must get different outputs (RoPE alone cannot tell them apart here).
    model = tiny_model(tok)
    x = torch.full((1, 8), tok.convert_tokens_to_ids("a"))
    with torch.no_grad():
        logits = model(x).logits
    assert (logits[0, 0] - logits[0, 5]).abs().max() > 1e-4


def test_model_never_attends_pad_and_takes_pipeline_arguments(tok):
    model = tiny_model(tok)
    ids, prompt_mask = encode_prompts(tok, ["rev:abc", "rev:abcdef"], 10)
    x = torch.cat([ids, torch.full((2, 6), tok.mask_token_id)], 1)
    mask = torch.cat([prompt_mask, torch.ones(2, 6, dtype=torch.long)], 1)
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        given = model(x, attention_mask=mask, position_ids=pos).logits
        defaults = model(x).logits
        all_ones = model(x, attention_mask=torch.ones_like(mask)).logits
    assert torch.allclose(given, defaults, atol=1e-6) and torch.allclose(given, all_ones, atol=1e-6)
    # Truncating after a block (LLaDA2Pipeline's window) is a valid call too.
    with torch.no_grad():
        window = model(x[:, :12], attention_mask=mask[:, :12], position_ids=pos[:, :12]).logits
    assert window.shape == (2, 12, len(tok))


def test_model_runs_inside_diffusers_llada2_pipeline(tok):
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline

    pipe = LLaDA2Pipeline(model=tiny_model(tok), scheduler=BlockRefinementScheduler(), tokenizer=tok)
    ids, mask = encode_prompts(tok, ["rev:abc", "rev:abcdef"], 24)
    out = pipe(input_ids=ids, attention_mask=mask, gen_length=16, block_length=8, num_inference_steps=8,
               eos_early_stop=False, output_type="seq")
    assert out.sequences.shape == (2, 16) and not (out.sequences == tok.mask_token_id).any()


def test_model_rejects_causal_config_and_out_of_range_positions(tok):
    cfg = text_model_config(len(tok), tok.pad_token_id, hidden_size=32, num_layers=1, num_heads=4, max_positions=8)
    cfg.is_causal = True
    with pytest.raises(ValueError, match="is_causal=False"):
        DiffusionLlama(cfg)
    with pytest.raises(ValueError, match="positions"):
        tiny_model(tok, max_positions=8)(torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of num_heads"):
        text_model_config(10, 0, hidden_size=30, num_layers=1, num_heads=4, max_positions=8)


def test_saved_model_loads_back_exactly_and_fp16_export_stays_close(tok, tmp_path):
    model = tiny_model(tok)
    x = torch.randint(4, len(tok), (2, 10))
    with torch.no_grad():
        ref = model(x).logits
    model.save_pretrained(tmp_path / "fp32")
    tok.save_pretrained(tmp_path / "fp32")
    loaded, loaded_tok = load_text_model(tmp_path / "fp32")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)
    assert loaded_tok.mask_token_id == tok.mask_token_id
    train_mod.export(model, tok, tmp_path / "fp16", {"seed": 0})
    half, _ = load_text_model(tmp_path / "fp16")
    assert load_file(tmp_path / "fp16" / "model.safetensors")["position_embedding.weight"].dtype == torch.float16
    with torch.no_grad():
        assert torch.allclose(half(x).logits, ref, atol=2e-2)
    assert json.loads((tmp_path / "fp16" / "training.json").read_text()) == {"seed": 0}


# training -------------------------------------------------------------------------------------------------------

TINY_RUN = ["--hidden", "32", "--layers", "2", "--heads", "4", "--batch-short", "16", "--batch-long", "2",
            "--eval-every", "1000", "--decode-every", "0", "--checkpoint-every", "3", "--warmup", "2", "--lr", "3e-3", "--threads", "1"]


def _fixed_loss(model, tok, args):
    """The training loss of one fixed, never-trained-on step's data and masks."""
    with torch.no_grad():
        return training_loss(model, tok, 10 ** 6, args, 0).item()


def _checkpoint_model(run_dir, tok):
    model = tiny_model(tok, max_positions=max(layout.seq_length for layout in LAYOUTS.values()))
    model.load_state_dict(load_file(run_dir / "checkpoint" / "model.safetensors"))
    return model


def test_corrupt_masks_only_the_span_at_rate_t():
    ids = torch.arange(4 * 200).reshape(4, 200)
    noisy, masked = corrupt(ids, 40, torch.tensor([0.0, 0.25, 0.75, 1.0]), -1, torch.Generator().manual_seed(0))
    assert not masked[:, :40].any() and not masked[0].any() and masked[3, 40:].all()
    assert (noisy[masked] == -1).all() and torch.equal(noisy[~masked], ids[~masked])
    assert 0.15 < masked[1, 40:].float().mean() < 0.35 and 0.65 < masked[2, 40:].float().mean() < 0.85


def test_step_examples_cover_every_task_and_differ_by_step_and_rank():
    groups = step_examples(0, 0, 0, 13, 2)
    assert len(groups["short"]) == 13 and len(groups["long"]) == 2
    assert {e.task for e in groups["short"]} == set(SHORT_TASKS)
    assert groups == step_examples(0, 0, 0, 13, 2)
    assert groups != step_examples(1, 0, 0, 13, 2) and groups != step_examples(0, 0, 1, 13, 2)
    assert "long" not in step_examples(0, 0, 0, 13, 0)


def test_split_counts_follow_the_shares():
    per_share = 10
    total = per_share * sum(TASK_SHARES[t] for t in SHORT_TASKS)
    counts = split_counts(total, SHORT_TASKS)
    assert counts == {t: per_share * TASK_SHARES[t] for t in SHORT_TASKS}
    assert sum(split_counts(total - 3, SHORT_TASKS).values()) == total - 3


def test_a_few_steps_lower_the_loss(tmp_path, tok):
    args = argparse.Namespace(seed=0, batch_short=24, batch_long=2, truncate_prob=0.0)
    before = _fixed_loss(tiny_model(tok, max_positions=272), tok, args)
    assert train_mod.main(["--out", str(tmp_path), "--steps", "12", *TINY_RUN]) == 0
    after = _fixed_loss(_checkpoint_model(tmp_path, tok), tok, args)
    assert after < 0.9 * before, (before, after)


def test_resume_continues_exactly(tmp_path, tok, monkeypatch):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run = ["--steps", "6", "--truncate-prob", "0.5", *TINY_RUN]
    train_mod.main(["--out", str(straight), *run])

    real = train_mod.training_loss

    def interrupted(model, tokenizer, step, args, rank):
        if step == 4:
            raise KeyboardInterrupt  # after the checkpoint at step 3, before step 5's update
        return real(model, tokenizer, step, args, rank)

    monkeypatch.setattr(train_mod, "training_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_mod.main(["--out", str(broken), *run])
    monkeypatch.setattr(train_mod, "training_loss", real)
    assert json.loads((broken / "checkpoint" / "state.json").read_text())["step"] == 3
    train_mod.main(["--out", str(broken), "--resume", *run])

    a, b = (load_file(d / "checkpoint" / "model.safetensors") for d in (straight, broken))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a, opt_b = (torch.load(d / "checkpoint" / "optimizer.bin", weights_only=False) for d in (straight, broken))
    assert all(torch.equal(x["exp_avg"], y["exp_avg"]) for x, y in zip(opt_a["state"].values(), opt_b["state"].values()))


def test_resume_guards(tmp_path, capsys):
    def refused(argv, message):
        with pytest.raises(SystemExit):
            train_mod.main(argv)
        assert message in capsys.readouterr().err

    refused(["--out", str(tmp_path), "--resume", "--steps", "3", *TINY_RUN], "no checkpoint")
    train_mod.main(["--out", str(tmp_path), "--steps", "3", *TINY_RUN])
    refused(["--out", str(tmp_path), "--steps", "3", *TINY_RUN], "already exists")
    refused(["--out", str(tmp_path), "--resume", "--steps", "3", *TINY_RUN, "--lr", "1e-3"], "different settings")
    refused(["--out", str(tmp_path), "--resume", "--steps", "2", *TINY_RUN], "below the run's 3")
    refused(["--out", str(tmp_path / "x"), "--truncate-prob", "2", *TINY_RUN], "--truncate-prob")


def test_a_larger_steps_on_resume_adds_a_leg(tmp_path):
    from diffexit.common.training import warmup_cosine

    train_mod.main(["--out", str(tmp_path), "--steps", "3", *TINY_RUN])
    train_mod.main(["--out", str(tmp_path), "--resume", "--steps", "6", *TINY_RUN])
    legs = json.loads((tmp_path / "checkpoint" / "state.json").read_text())["legs"]
    assert [(leg["from_step"], leg["steps"]) for leg in legs] == [(0, 3), (3, 6)]
    assert "--resume --steps 6" in legs[1]["command"]
    # Steps before the new leg keep the first cosine; later ones follow the stretched one.
    totals = train_mod.schedule_totals(legs)
    assert [totals(s) for s in range(6)] == [3, 3, 3, 6, 6, 6]
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # The rate logged after update s is the one update s + 1 uses; the first leg logged its own end at step 3.
    assert lrs == pytest.approx([3e-3 * warmup_cosine(s, 2, 3 if s <= 3 else 6) for s in range(1, 7)])


# the shipped model ----------------------------------------------------------------------------------------------

def test_shipped_model_loads_offline_and_decodes_deterministically(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_embedded_text_model()
    assert sum(p.numel() for p in model.parameters()) * 2 < 10e6  # fp16 on disk, under ~10 MB
    for task in TASK_NAMES:
        layout = layout_of(task)
        examples = sample(task, "heldout", 0, 3)
        ids, mask = encode_prompts(tok, [e.prompt for e in examples], layout.prompt_length)
        block, steps = DECODE[layout.span_length]
        runs = [generate(model, ids, attention_mask=mask, gen_length=layout.span_length, steps=steps,
                         block_length=block, mask_id=tok.mask_token_id).generated for _ in range(2)]
        assert runs[0].shape == (3, layout.span_length) and torch.equal(runs[0], runs[1])
        assert not (runs[0] == tok.mask_token_id).any()
        outputs = [decode_answer(tok, span) for span in runs[0]]
        assert all(score(task, e.prompt, o) for e, o in zip(examples, outputs)), (task, outputs)


def test_shipped_model_needs_its_steps_on_the_discriminating_tasks():
    """On the tasks that tell halting rules apart, committing the whole span in one step gets (almost) nothing
    right, while full steps solve them (above); on the controls one step is enough (MODEL_CARD.md)."""
    model, tok = load_embedded_text_model()
    for task in TASK_NAMES:
        layout = layout_of(task)
        examples = sample(task, "heldout", 0, 8)
        ids, mask = encode_prompts(tok, [e.prompt for e in examples], layout.prompt_length)
        one = generate(model, ids, attention_mask=mask, gen_length=layout.span_length, steps=1,
                       block_length=layout.span_length, mask_id=tok.mask_token_id).generated
        right = sum(score(task, e.prompt, decode_answer(tok, span)) for e, span in zip(examples, one))
        if task in CONTROLS:
            assert right >= 6, (task, right)
        else:
            assert right <= 1, (task, right)
