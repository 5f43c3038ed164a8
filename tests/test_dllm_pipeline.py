"""MaskedDiffusionPipeline: loading a transformers model directory offline, text in, text out."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from diffexit.dllm import SchED, generate
from diffexit.dllm.pipeline import MaskedDiffusionPipeline
from diffexit.dllm.charlm.tokenizer import build_tokenizer
from diffexit.samplers import ThresholdSchedule


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, is_causal=False,
                      initializer_range=0.5)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[tok.mask_token_id] = 0.0
    path = tmp_path_factory.mktemp("tiny-dlm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_from_transformers_generates_text(saved_model):
    pipe = MaskedDiffusionPipeline.from_transformers(str(saved_model))
    out = pipe(["12+34=", "sort: cab"], gen_length=8, steps=8, block_length=4)
    assert len(out.texts) == 2 and all(isinstance(t, str) for t in out.texts)
    assert out.generation.nfe.tolist() == [8, 8]
    # The pipeline is a thin layer over generate(): same tokens for the same left-padded ids.
    tok = pipe.tokenizer
    enc = tok(["12+34=", "sort: cab"], return_tensors="pt", padding=True, add_special_tokens=False)
    direct = generate(pipe.model, enc["input_ids"], attention_mask=enc["attention_mask"], gen_length=8, steps=8,
                      block_length=4, mask_id=tok.mask_token_id)
    assert torch.equal(direct.sequences, out.generation.sequences)


def test_halting_and_dream_loop(saved_model):
    halting = SchED(ThresholdSchedule("constant", 0.0, 0.0))
    pipe = MaskedDiffusionPipeline.from_transformers(str(saved_model), halting=halting)
    assert pipe("hello", gen_length=8, steps=8).generation.nfe.tolist() == [1]
    dream = MaskedDiffusionPipeline.from_transformers(str(saved_model), loop="dream")
    out = dream("hello", gen_length=8, steps=4, alg="entropy")
    assert out.generation.nfe.tolist() == [4]
    with pytest.raises(ValueError, match="block_length: an option of the llada loop"):
        dream("hello", gen_length=8, steps=4, block_length=4)


def test_decode_cuts_at_eos(saved_model):
    pipe = MaskedDiffusionPipeline.from_transformers(str(saved_model))
    tok = pipe.tokenizer
    ids = tok(["ab"], add_special_tokens=False)["input_ids"][0] + [tok.eos_token_id] + tok(["zz"])["input_ids"][0]
    assert pipe.decode(torch.tensor([ids])) == ["ab"]


def test_errors(saved_model):
    pipe = MaskedDiffusionPipeline.from_transformers(str(saved_model))
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        pipe("", gen_length=8, steps=8)
    with pytest.raises(ValueError, match="loop must be one of"):
        MaskedDiffusionPipeline(pipe.model, pipe.tokenizer, loop="ar")
    tok = build_tokenizer()
    tok.mask_token = None
    with pytest.raises(ValueError, match="pass mask_id="):
        MaskedDiffusionPipeline(pipe.model, tok)


def test_the_embedded_format_saves_loads_and_decodes_as_generate(tmp_path, tiny_text_model):
    from diffexit.dllm.charlm.tokenizer import decode_answer, encode_prompts

    model, tok = tiny_text_model(max_positions=48, never_predict_mask=True)
    rule = SchED(ThresholdSchedule("cosine", 3.0, 1.0), stat="min")
    MaskedDiffusionPipeline(model, tok, prompt_length=24, halting=rule).save_pretrained(tmp_path / "pipe")
    pipe = MaskedDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert type(pipe.model).__name__ == "DiffusionLlama" and pipe.prompt_length == 24
    assert pipe.halting.to_dict() == rule.to_dict()
    prompts = ["rev:abcdef", "sort:3142"]
    out = pipe(prompts, gen_length=16, steps=16)
    ids, attention = encode_prompts(tok, prompts, 24)
    want = generate(model, ids, attention_mask=attention, gen_length=16, steps=16, mask_id=tok.mask_token_id,
                    halting=SchED(ThresholdSchedule("cosine", 3.0, 1.0), stat="min"))
    assert torch.equal(out.generation.sequences, want.sequences)
    assert out.texts == [decode_answer(tok, s).replace("[PAD]", "") for s in want.generated]
    with pytest.raises(ValueError, match="longer than this pipeline's prompt_length=24"):
        pipe(["rev:" + "a" * 30], gen_length=16, steps=16)
    # Built by hand without prompt_length, it takes the model's layout, not the longest prompt's.
    from diffexit.dllm.charlm.tasks import LAYOUTS

    assert {layout.prompt_length for layout in LAYOUTS.values()} == {type(model).prompt_length}
    by_hand = MaskedDiffusionPipeline(model, tok, halting=rule)
    assert by_hand.prompt_length == 24
    assert torch.equal(by_hand(prompts, gen_length=16, steps=16).generation.sequences, want.sequences)


def test_from_transformers_refuses_a_checkpoint_whose_weights_it_would_drop(tmp_path, tiny_text_model):
    model, tok = tiny_text_model(max_positions=48)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"drops its weights \['position_embedding.weight'\]"):
        MaskedDiffusionPipeline.from_transformers(str(tmp_path))
