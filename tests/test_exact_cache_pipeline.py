"""ExactCacheLLaDA2Pipeline: diffusers' LLaDA2Pipeline with the exact KV cache of a block-causal model gives the
stock pipeline's tokens, running each step over the current block only."""

import pytest
import torch
from diffusers import BlockRefinementScheduler, LLaDA2Pipeline

from diffexit.dllm.charlm.model import DiffusionLlama, load_embedded_block_model, text_model_config
from diffexit.dllm.charlm.tasks import sample
from diffexit.dllm.charlm.tokenizer import build_tokenizer, encode_prompts
from diffexit.samplers import ExactCacheLLaDA2Pipeline, SchEDScheduler

PROMPT, BLOCK = 8, 4


def tiny_block_model(tok, seed=0, prompt_length=PROMPT):
    torch.manual_seed(seed)
    cfg = text_model_config(len(tok), tok.pad_token_id, hidden_size=32, num_layers=2, num_heads=4, max_positions=40,
                            block_length=BLOCK, prompt_length=prompt_length)
    return DiffusionLlama(cfg).eval()


def passes(model):
    """A list that records the token count of every forward pass of ``model`` (what reaches its embedding, after
    the pipeline's hooks), and the hook's handle."""
    lengths = []
    handle = model.model.embed_tokens.register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[1]))
    return lengths, handle


def both(model, tok, scheduler, ids, mask, gen_length, **kw):
    """``(stock sequences, cached sequences, cached pass lengths, stock pass lengths)`` for the same call."""
    out = []
    for cls in (LLaDA2Pipeline, ExactCacheLLaDA2Pipeline):
        pipe = cls(model=model, scheduler=scheduler, tokenizer=tok)
        pipe.set_progress_bar_config(disable=True)
        lengths, handle = passes(model)
        try:
            seq = pipe(input_ids=ids, attention_mask=mask, gen_length=gen_length, block_length=BLOCK,
                       num_inference_steps=BLOCK, output_type="seq", **kw).sequences
        finally:
            handle.remove()
        out.append((seq, lengths))
    (stock, stock_lengths), (cached, cached_lengths) = out
    return stock, cached, cached_lengths, stock_lengths


@pytest.fixture(scope="module")
def block_model():
    return load_embedded_block_model()


@pytest.mark.parametrize("task,span", [("zip", 16), ("trio", 16)])
@pytest.mark.parametrize("options", [dict(threshold=1.1, editing_threshold=None),  # one token per step
                                     dict()])  # the stock defaults: threshold 0.7, editing, EOS stopping
def test_equals_the_stock_pipeline_on_charlm_block(block_model, task, span, options):
    model, tok = block_model
    ids, mask = encode_prompts(tok, [e.prompt for e in sample(task, "heldout", 3, 6)], 24)
    scheduler = BlockRefinementScheduler(block_length=BLOCK, num_inference_steps=BLOCK)
    stock, cached, lengths, stock_lengths = both(model, tok, scheduler, ids, mask, span, **options)
    assert torch.equal(stock, cached)
    assert len(lengths) == len(stock_lengths)
    # Each pass runs the current block, and a block's first pass the block before it too (the prompt, at first).
    assert lengths[0] == 24 + BLOCK and set(lengths[1:]) <= {BLOCK, 2 * BLOCK}
    assert sum(lengths) < sum(stock_lengths)


def test_equals_the_stock_pipeline_with_sched_halting(block_model):
    model, tok = block_model
    ids, mask = encode_prompts(tok, [e.prompt for e in sample("pick", "heldout", 4, 6)], 24)
    stock_config = BlockRefinementScheduler(block_length=BLOCK, num_inference_steps=BLOCK).config
    scheduler = SchEDScheduler.from_config(stock_config, schedule="cosine", stat="min")
    stock, cached, _, stock_lengths = both(model, tok, scheduler, ids, mask, 16, threshold=1.1,
                                           editing_threshold=None)
    assert torch.equal(stock, cached)
    assert len(stock_lengths) < 16  # it halted some blocks


def test_padding_committed_in_a_kept_block_stays_unattended():
    # A tiny random model that leans to the padding token: padding lands in blocks whose K/V are kept.
    tok = build_tokenizer()
    model = tiny_block_model(tok, seed=2)
    model.lm_head.weight.data *= 20
    model.lm_head.weight.data[tok.pad_token_id] *= 2
    ids, mask = encode_prompts(tok, ["rev:ab", "rev:abc", "add:1+2", "q:zz"], PROMPT)
    scheduler = BlockRefinementScheduler(block_length=BLOCK, num_inference_steps=BLOCK)
    stock, cached, _, _ = both(model, tok, scheduler, ids, mask, 12, threshold=1.1, editing_threshold=None,
                               eos_early_stop=False)
    assert (stock[:, :8] == tok.pad_token_id).any()
    assert torch.equal(stock, cached)


def test_a_callback_that_rewrites_a_kept_token_gets_the_stock_result():
    tok = build_tokenizer()
    model = tiny_block_model(tok)
    ids, mask = encode_prompts(tok, ["rev:ab", "add:1+2"], PROMPT)

    def rewrite(pipe, step, timestep, kwargs):
        block_x = kwargs["block_x"]
        if step == 5:  # in block 1: a token of block 0, whose K/V are kept by now
            block_x[:, PROMPT] = 50
        return {"block_x": block_x}

    scheduler = BlockRefinementScheduler(block_length=BLOCK, num_inference_steps=BLOCK)
    stock, cached, lengths, _ = both(model, tok, scheduler, ids, mask, 12, threshold=1.1, editing_threshold=None,
                                     eos_early_stop=False, callback_on_step_end=rewrite)
    assert (stock[:, 0] == 50).all() and torch.equal(stock, cached)
    assert PROMPT + 2 * BLOCK in lengths  # the step after the rewrite ran the whole window again


def test_the_hooks_are_gone_after_the_call():
    tok = build_tokenizer()
    model = tiny_block_model(tok)
    ids, mask = encode_prompts(tok, ["rev:ab"], PROMPT)
    x = torch.cat([ids, torch.full((1, 8), tok.mask_token_id)], 1)
    with torch.no_grad():
        before = model(x).logits
    pipe = ExactCacheLLaDA2Pipeline(model=model, scheduler=BlockRefinementScheduler(block_length=BLOCK), tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    pipe(input_ids=ids, attention_mask=mask, gen_length=8, num_inference_steps=BLOCK, output_type="seq")
    with torch.no_grad():
        after = model(x).logits
    assert after.shape == before.shape and torch.equal(before, after)


def test_bad_models_and_calls_are_refused_before_any_forward_pass(tiny_text_model):
    bidirectional, tok = tiny_text_model()
    with pytest.raises(ValueError, match="needs a block-causal model.*stock LLaDA2Pipeline"):
        ExactCacheLLaDA2Pipeline(model=bidirectional, scheduler=BlockRefinementScheduler(), tokenizer=tok)
    with pytest.raises(ValueError, match="not a multiple of its blocks of 4"):
        ExactCacheLLaDA2Pipeline(model=tiny_block_model(tok, prompt_length=6), scheduler=BlockRefinementScheduler(),
                                 tokenizer=tok)
    model = tiny_block_model(tok)
    lengths, handle = passes(model)
    pipe = ExactCacheLLaDA2Pipeline(model=model, scheduler=BlockRefinementScheduler(block_length=8), tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    ids, mask = encode_prompts(tok, ["rev:ab"], PROMPT)
    with pytest.raises(ValueError, match="call the pipeline with block_length=4"):
        pipe(input_ids=ids, attention_mask=mask, gen_length=8, output_type="seq")
    short, short_mask = encode_prompts(tok, ["rev:ab"], 6)
    with pytest.raises(ValueError, match="pad the prompts to 8 \\(they are 6\\)"):
        pipe(input_ids=short, attention_mask=short_mask, gen_length=8, block_length=BLOCK, output_type="seq")
    handle.remove()
    assert lengths == []
