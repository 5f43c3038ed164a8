"""Block-causal attention in the embedded text model family: what a position may read, and that a KV cache of the
prompt and finished blocks gives the logits of a full forward pass."""

import pytest
import torch
from transformers import DynamicCache

from diffexit.dllm.charlm.model import DiffusionLlama, text_model_config
from diffexit.dllm.exact_cache import block_causal_layout
from diffexit.dllm.charlm.tokenizer import build_tokenizer, encode_prompts

PROMPT, BLOCK, SPAN = 8, 4, 12


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def block_model(tok, seed=0):
    torch.manual_seed(seed)
    cfg = text_model_config(len(tok), tok.pad_token_id, hidden_size=32, num_layers=2, num_heads=4, max_positions=32,
                            block_length=BLOCK, prompt_length=PROMPT)
    return DiffusionLlama(cfg).eval()


def _perturb(x, cols, tok):
    y = x.clone()
    y[:, cols] = (x[:, cols] - 3) % (len(tok) - 4) + 4
    return y


def _sequence(tok, batch=2):
    ids, mask = encode_prompts(tok, ["rev:ab", "rev:abc"][:batch], PROMPT)
    span = torch.randint(4, len(tok), (batch, SPAN), generator=torch.Generator().manual_seed(1))
    return torch.cat([ids, span], 1), torch.cat([mask, torch.ones(batch, SPAN, dtype=torch.long)], 1)


def test_a_position_never_reads_a_later_block_and_reads_its_own(tok):
    model = block_model(tok)
    x, mask = _sequence(tok)
    with torch.no_grad():
        base = model(x, attention_mask=mask).logits
        # Change the last block: the prompt and the first two blocks do not move, the last block does.
        last = model(_perturb(x, slice(PROMPT + 2 * BLOCK, None), tok), attention_mask=mask).logits
        # Change the last token of the first block: its first token moves (bidirectional within the block).
        own = model(_perturb(x, [PROMPT + BLOCK - 1], tok), attention_mask=mask).logits
        # Change the whole span: the prompt does not move.
        span = model(_perturb(x, slice(PROMPT, None), tok), attention_mask=mask).logits
    assert torch.equal(base[:, :PROMPT + 2 * BLOCK], last[:, :PROMPT + 2 * BLOCK])
    assert (base[:, PROMPT + 2 * BLOCK:] - last[:, PROMPT + 2 * BLOCK:]).abs().max() > 1e-4
    assert (base[:, PROMPT] - own[:, PROMPT]).abs().max() > 1e-4
    assert torch.equal(base[:, :PROMPT], span[:, :PROMPT])


def test_the_bidirectional_model_is_unchanged_by_the_option(tok):
    torch.manual_seed(0)
    cfg = text_model_config(len(tok), tok.pad_token_id, hidden_size=32, num_layers=2, num_heads=4, max_positions=32)
    bidirectional = DiffusionLlama(cfg).eval()
    assert block_causal_layout(bidirectional) is None
    x, mask = _sequence(tok)
    with torch.no_grad():
        a = bidirectional(x, attention_mask=mask).logits
        b = bidirectional(_perturb(x, [x.shape[1] - 1], tok), attention_mask=mask).logits
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4  # the last position still reaches the first


def test_cached_prefix_gives_the_full_forward_logits(tok):
    # The exact cache's premise, re-derived here: the K/V of the prompt and of a finished block, written by one
    # forward pass, let a later block run alone and get the logits the whole sequence gives it.
    model = block_model(tok)
    x, mask = _sequence(tok)
    with torch.no_grad():
        full = model(x, attention_mask=mask).logits
        cut = PROMPT + BLOCK
        head = model(x[:, :cut], attention_mask=mask[:, :cut], use_cache=True)
        cache = head.cache
        positions = torch.arange(cut, cut + BLOCK).unsqueeze(0)
        later = model(x[:, cut:cut + BLOCK], attention_mask=mask[:, :cut + BLOCK], position_ids=positions,
                      cache=cache, use_cache=True).logits
    torch.testing.assert_close(head.logits, full[:, :cut], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(later, full[:, cut:cut + BLOCK], atol=1e-5, rtol=1e-5)
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == cut + BLOCK


def test_block_length_survives_save_and_load(tok, tmp_path):
    model = block_model(tok)
    model.save_pretrained(tmp_path)
    loaded = DiffusionLlama.from_pretrained(tmp_path).eval()
    assert block_causal_layout(loaded) == (PROMPT, BLOCK)
    x, mask = _sequence(tok)
    with torch.no_grad():
        assert torch.equal(model(x, attention_mask=mask).logits, loaded(x, attention_mask=mask).logits)


def test_bad_block_layouts_are_refused(tok):
    with pytest.raises(ValueError, match="block_length must be None"):
        text_model_config(len(tok), 0, hidden_size=32, num_layers=1, num_heads=4, max_positions=32, block_length=0)
    with pytest.raises(ValueError, match="prompt_length must be"):
        text_model_config(len(tok), 0, hidden_size=32, num_layers=1, num_heads=4, max_positions=32, block_length=4,
                          prompt_length=32)
    model = block_model(tok)
    x, mask = _sequence(tok)
    with torch.no_grad():
        cache = model(x[:, :PROMPT], attention_mask=mask[:, :PROMPT], use_cache=True).cache
        with pytest.raises(ValueError, match=r"must be \[2, 12\]"):
            model(x[:, PROMPT:PROMPT + BLOCK], attention_mask=mask[:, PROMPT:PROMPT + BLOCK],
                  position_ids=torch.arange(PROMPT, PROMPT + BLOCK)[None], cache=cache, use_cache=True)


def test_block_objective_trains_each_noisy_block_on_what_decoding_shows_it(tok):
    # Re-derivation: noisy block b of the vectorised input gets the logits of a plain forward over the prompt, the
    # clean blocks before b and noisy block b alone.
    from diffexit.dllm.charlm.block_objective import block_diffusion_inputs

    model = block_model(tok)
    x, mask = _sequence(tok)
    noisy = x[:, PROMPT:].clone()
    noisy[:, ::3] = tok.mask_token_id
    ids, mask4, positions = block_diffusion_inputs(model, x, mask, PROMPT, noisy)
    assert ids.shape == (2, PROMPT + 2 * SPAN) and mask4.shape == (2, 1, PROMPT + 2 * SPAN, PROMPT + 2 * SPAN)
    with torch.no_grad():
        joint = model(ids, attention_mask=mask4, position_ids=positions).logits
        plain = model(x, attention_mask=mask).logits
        torch.testing.assert_close(joint[:, :PROMPT + SPAN], plain, atol=1e-5, rtol=1e-5)
        for b in range(SPAN // BLOCK):
            start = PROMPT + b * BLOCK
            seq = torch.cat([x[:, :start], noisy[:, b * BLOCK:(b + 1) * BLOCK]], 1)
            alone = model(seq, attention_mask=mask[:, :start + BLOCK]).logits[:, start:]
            got = joint[:, PROMPT + SPAN + b * BLOCK:PROMPT + SPAN + (b + 1) * BLOCK]
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)


def test_conversion_from_a_bidirectional_model_trains(tok, tmp_path, capsys):
    # --init-from with --block-length: the bidirectional weights load into the block-causal model, a few steps of
    # the block objective run, and the export is block-causal.
    from diffexit.dllm.charlm.model import load_text_model
    from diffexit.dllm.charlm.train import main

    torch.manual_seed(0)
    cfg = text_model_config(len(tok), tok.pad_token_id, hidden_size=32, num_layers=1, num_heads=4, max_positions=160)
    DiffusionLlama(cfg).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    args = ["--out", str(tmp_path / "run"), "--steps", "2", "--warmup", "1", "--hidden", "32", "--layers", "1",
            "--heads", "4", "--batch-short", "15", "--batch-long", "1", "--block-length", "4",
            "--init-from", str(tmp_path / "teacher"), "--eval-every", "100", "--decode-every", "0",
            "--export", str(tmp_path / "out")]
    assert main(args) == 0
    model, _ = load_text_model(tmp_path / "out")
    assert block_causal_layout(model) == (24, 4)
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "run2"), "--block-length", "4", "--init-from", str(tmp_path / "nowhere")])
    assert "no exported model" in capsys.readouterr().err


# the exact prefix cache ------------------------------------------------------------------------------------------

def _decode(model, tok, cache, parallel=None, prompts=("rev:ab", "rev:abc", "add:1+2", "p:a")):
    from diffexit.dllm import generate

    ids, mask = encode_prompts(tok, list(prompts), PROMPT)
    return generate(model, ids, attention_mask=mask, gen_length=SPAN, steps=SPAN, block_length=BLOCK,
                    mask_id=tok.mask_token_id, cache=cache, parallel_threshold=parallel)


@pytest.mark.parametrize("parallel", [None, 0.3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_cache_decodes_the_tokens_of_no_cache(tok, seed, parallel):
    # Padded prompts of several lengths; with parallel commits the samples finish blocks at different steps, so
    # the batch is split by block and compacted as samples finish.
    model = block_model(tok, seed)
    # Confident enough that some tokens clear the parallel threshold, not so confident that float64
    # probabilities saturate at 1.0 (then ties are broken by float32 rounding of the logits, not by the model).
    model.lm_head.weight.data *= 20
    plain, cached = _decode(model, tok, None, parallel), _decode(model, tok, "prefix", parallel)
    assert torch.equal(plain.sequences, cached.sequences)
    assert torch.equal(plain.nfe, cached.nfe)
    if parallel is not None:
        assert int(plain.nfe.min()) < SPAN  # blocks did end early (with seeds 0 and 2, at different steps)


def test_written_keys_and_values_are_those_of_a_fresh_forward(tok):
    # Independent re-derivation: after decoding, the cache holds, for the prompt and every block but the last,
    # the K/V a forward pass over the final sequence gives those positions.
    from diffexit.dllm import exact_cache

    model = block_model(tok)
    kept = []
    original = exact_cache.ExactPrefixCache.step

    def spy(self, *args):
        kept.append(self)
        return original(self, *args)

    exact_cache.ExactPrefixCache.step = spy
    try:
        out = _decode(model, tok, "prefix")
    finally:
        exact_cache.ExactPrefixCache.step = original
    ids, mask = encode_prompts(tok, ["rev:ab", "rev:abc", "add:1+2", "p:a"], PROMPT)
    full_mask = torch.cat([mask, torch.ones(4, SPAN, dtype=torch.long)], 1)
    with torch.no_grad():
        fresh = model(out.sequences, attention_mask=full_mask, use_cache=True).cache
    written = PROMPT + SPAN - BLOCK
    cache = kept[0]
    for layer, k, v in zip(fresh.layers, cache.keys, cache.values):
        torch.testing.assert_close(k[:, :, :written], layer.keys[:, :, :written], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v[:, :, :written], layer.values[:, :, :written], atol=1e-5, rtol=1e-5)


def test_block_causal_decoding_refuses_what_does_not_fit(tok):
    from diffexit.dllm import Prophet, generate

    model = block_model(tok)
    ids, mask = encode_prompts(tok, ["rev:ab"], PROMPT)
    kw = dict(attention_mask=mask, gen_length=SPAN, steps=SPAN, mask_id=tok.mask_token_id)
    with pytest.raises(ValueError, match="decode with block_length=4"):
        generate(model, ids, block_length=2, **kw)
    with pytest.raises(ValueError, match="use cache='prefix'"):
        generate(model, ids, block_length=BLOCK, cache="dual", **kw)
    with pytest.raises(ValueError, match="use SchED"):
        generate(model, ids, block_length=BLOCK, cache="prefix", halting=Prophet(), **kw)
    short, short_mask = encode_prompts(tok, ["rev:ab"], PROMPT - 2)
    with pytest.raises(ValueError, match=f"pad the prompts to {PROMPT}"):
        generate(model, short, **{**kw, "attention_mask": short_mask}, block_length=BLOCK)
