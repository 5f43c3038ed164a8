"""The approximate caches' refresh policy, through ``generate(cache_refresh=...)``: ``k`` rewrites the kept K/V
with a whole-sequence pass at every k-th later step of a block (1: decoding without a cache; past the block's
steps: Fast-dLLM's cache); ``"confidence:C"`` at the step after one that committed a token at probability <= C (0:
Fast-dLLM's cache; 1: no cache when every step commits). Each is checked against the uncached and plain-cache
decodes, and the confidence policy's passes against a re-derivation from the recorded logits."""

import pytest
import torch

from diffexit.dllm import generate
from diffexit.dllm.charlm.model import DiffusionLlama, text_model_config
from diffexit.dllm.kv_cache import BlockCache, check_refresh

GEN, BLOCK, PLEN = 12, 4, 5


@pytest.fixture(scope="module")
def setup(tiny_text_model):
    model, tok = tiny_text_model(max_positions=32, initializer_range=0.5, never_predict_mask=True)
    prompts = torch.randint(10, 60, (3, PLEN), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(prompts)
    attention[0, :2] = 0  # a left-padded sample
    return model, tok.mask_token_id, prompts, attention


def decode(setup, model=None, **kw):
    """``generate`` on the fixture's prompts, and the token count of every forward pass."""
    base, mask_id, prompts, attention = setup
    model = model or base
    lengths = []
    handle = base.model.embed_tokens.register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[1]))
    try:
        out = generate(model, prompts, attention_mask=attention, mask_id=mask_id, gen_length=GEN, steps=GEN,
                       block_length=BLOCK, **kw)
    finally:
        handle.remove()
    return out, lengths


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("refresh", [1, "confidence:1"])
def test_refreshing_every_step_is_decoding_without_a_cache(setup, cache, refresh):
    plain, _ = decode(setup)
    every, lengths = decode(setup, cache=cache, cache_refresh=refresh)
    assert torch.equal(every.sequences, plain.sequences) and torch.equal(every.nfe, plain.nfe)
    assert set(lengths) == {PLEN + GEN}  # every pass ran the whole sequence


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("refresh", [BLOCK, 100, "confidence:0"])
def test_a_refresh_that_never_falls_due_is_the_plain_cache(setup, cache, refresh):
    # A block has BLOCK steps (BLOCK - 1 later ones); an argmax is never committed at probability 0.
    plain, plain_lengths = decode(setup, cache=cache)
    never, lengths = decode(setup, cache=cache, cache_refresh=refresh)
    assert torch.equal(never.sequences, plain.sequences) and lengths == plain_lengths


def test_every_second_step_runs_the_whole_sequence(setup):
    _, lengths = decode(setup, cache="prefix", cache_refresh=2)
    full = PLEN + GEN
    # Per block (4 steps): its first step and its second later step run everything; the others the window, which
    # for the prefix cache is the block and all after it.
    want = [n for b in range(GEN // BLOCK) for n in (full, full - PLEN - b * BLOCK, full, full - PLEN - b * BLOCK)]
    assert lengths == want


def _committed_probabilities(calls, mask_id):
    """Per pass of a one-sample decode, the smallest probability (from that pass's own logits) of the tokens it
    committed, read off the next pass's input ids (None: it committed none); the last pass is left out. A pass's
    ids and logits cover the sequence's last positions, from ``start``."""
    whole = PLEN + GEN
    out = []
    for now, after in zip(calls, calls[1:]):
        start_now, start_after = whole - now.ids.shape[1], whole - after.ids.shape[1]
        lowest = None
        for pos in range(max(start_now, start_after), whole):
            token = int(after.ids[0, pos - start_after])
            if now.ids[0, pos - start_now] == mask_id and token != mask_id:
                p = float(torch.softmax(now.logits[0, pos - start_now].double(), -1)[token])
                lowest = p if lowest is None else min(lowest, p)
        out.append(lowest)
    return out


@pytest.mark.parametrize("level", [0.3, 0.6, 0.9])
def test_confidence_refreshes_after_a_step_that_committed_an_improbable_token(setup, level, recorder):
    base, mask_id, prompts, attention = setup
    rec = recorder(base)
    generate(rec, prompts[1:2], attention_mask=attention[1:2], mask_id=mask_id, gen_length=GEN, steps=GEN,
             block_length=BLOCK, cache="prefix", cache_refresh=f"confidence:{level}")
    assert len(rec.calls) == GEN  # one sample, one pass a step
    lowest = _committed_probabilities(rec.calls, mask_id)
    for i, call in enumerate(rec.calls):
        whole = call.ids.shape[1] == PLEN + GEN
        if i % BLOCK == 0:
            assert whole  # a block's first step
        else:
            assert whole == (lowest[i - 1] is not None and lowest[i - 1] <= level), i


def test_the_confidence_levels_tried_above_refresh_some_steps_but_not_all(setup):
    # Otherwise the re-derivation above would only see the two extremes.
    counts = []
    for level in (0.3, 0.6, 0.9):
        _, lengths = decode(setup, cache="prefix", cache_refresh=f"confidence:{level}")
        counts.append(sum(n == PLEN + GEN for n in lengths))
    plain = 3 * GEN // BLOCK
    assert any(plain < c < 3 * GEN for c in counts), counts


def test_samples_due_and_not_due_in_one_step_are_each_served(setup):
    # Samples of one block whose K/V were written at different steps (parallel commits move samples through blocks
    # unevenly): in one call, the due one gets the whole sequence's fresh logits, the other the kept K/V's.
    model, mask_id, prompts, attention = setup
    x = torch.cat([prompts, torch.full((3, GEN), mask_id)], 1)
    mask = torch.cat([attention, torch.ones(3, GEN, dtype=torch.long)], 1)
    refreshed, plain = (BlockCache("prefix", model, PLEN, BLOCK, mask, refresh=r) for r in (2, None))
    both_rows, first_row = torch.arange(2), torch.tensor([0])
    with torch.no_grad():
        for cache in (refreshed, plain):
            start = x.clone()
            cache.full(start, both_rows)
            start[0, PLEN] = 40  # sample 0 commits a token, then takes a later step alone
            cache.later(start, first_row, 0)
        x[0, PLEN], x[1, PLEN + 1] = 40, 41
        got = refreshed.later(x, both_rows, 0)  # sample 0's second later step: due; sample 1's first: not
        fresh = model(x[both_rows], attention_mask=mask[both_rows]).logits[:, PLEN:]
        kept = plain.later(x, both_rows, 0)
    torch.testing.assert_close(got[0], fresh[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], kept[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(kept[0], fresh[0], atol=1e-3)  # sample 0's kept K/V were stale
    assert refreshed.since.tolist()[:2] == [0, 1]


def test_the_forms_are_normalised():
    assert check_refresh(None) is None and check_refresh(3) == 3 and check_refresh("3") == 3
    assert check_refresh("confidence:1") == "confidence:1.0" == check_refresh(check_refresh("confidence:1"))
    assert check_refresh("confidence:.9") == "confidence:0.9"


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "0", "confidence:1.5", "confidence:-0.1", "confidence:x",
                                 "confidence:nan", "conf:0.5", "every"])
def test_a_bad_refresh_is_refused(setup, bad):
    with pytest.raises(ValueError, match="cache_refresh must be None .*, a whole number k .* or 'confidence:C'"):
        decode(setup, cache="prefix", cache_refresh=bad)


def test_a_refresh_without_a_cache_is_refused(setup):
    with pytest.raises(ValueError, match="there is no cache: give cache='prefix' or 'dual', or drop cache_refresh"):
        decode(setup, cache_refresh=2)


def test_a_confidence_refresh_with_random_remasking_is_refused(setup):
    with pytest.raises(ValueError, match="remasking='random' commits by a uniform draw"):
        decode(setup, cache="prefix", cache_refresh="confidence:0.9", remasking="random")


def test_a_refresh_on_a_block_causal_model_is_refused(tiny_text_model):
    _, tok = tiny_text_model()
    torch.manual_seed(0)
    config = text_model_config(len(tok), tok.pad_token_id, hidden_size=32, num_layers=2, num_heads=4,
                               max_positions=32, block_length=BLOCK, prompt_length=8)
    model = DiffusionLlama(config).eval()
    prompts = torch.randint(10, 60, (1, 8))
    with pytest.raises(ValueError, match="block-causal model cache='prefix' is exact and never stale"):
        generate(model, prompts, mask_id=tok.mask_token_id, gen_length=GEN, steps=GEN, block_length=BLOCK,
                 cache="prefix", cache_refresh=2)
