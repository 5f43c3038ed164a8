"""The approximate caches' refresh policy (``BlockCache(refresh=r)``): every r-th later step of a block runs the
whole sequence and rewrites the kept K/V; r=1 is decoding without a cache, r past the block's steps is Fast-dLLM's.

``generate`` builds its ``BlockCache`` without the option, so these tests build it through a stand-in class."""

import functools
import importlib

import pytest
import torch

from diffexit.dllm import generate
from diffexit.dllm.kv_cache import BlockCache

generate_module = importlib.import_module("diffexit.dllm.generate")  # the package exports a function of that name

GEN, BLOCK, PLEN = 12, 4, 5


@pytest.fixture(scope="module")
def setup(tiny_text_model):
    model, tok = tiny_text_model(max_positions=32, initializer_range=0.5, never_predict_mask=True)
    prompts = torch.randint(10, 60, (3, PLEN), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(prompts)
    attention[0, :2] = 0  # a left-padded sample
    return model, tok.mask_token_id, prompts, attention


def decode(setup, monkeypatch, cache, refresh, **kw):
    """``generate`` with its caches refreshed every ``refresh`` steps, and the token count of every forward pass."""
    model, mask_id, prompts, attention = setup
    monkeypatch.setattr(generate_module, "BlockCache", functools.partial(BlockCache, refresh=refresh))
    lengths = []
    handle = model.model.embed_tokens.register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[1]))
    try:
        out = generate(model, prompts, attention_mask=attention, mask_id=mask_id, gen_length=GEN, steps=GEN,
                       block_length=BLOCK, cache=cache, **kw)
    finally:
        handle.remove()
    return out, lengths


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_refreshing_every_step_is_decoding_without_a_cache(setup, monkeypatch, cache):
    model, mask_id, prompts, attention = setup
    plain = generate(model, prompts, attention_mask=attention, mask_id=mask_id, gen_length=GEN, steps=GEN,
                     block_length=BLOCK)
    every, lengths = decode(setup, monkeypatch, cache, 1)
    assert torch.equal(every.sequences, plain.sequences) and torch.equal(every.nfe, plain.nfe)
    assert set(lengths) == {PLEN + GEN}  # every pass ran the whole sequence


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_a_refresh_past_the_blocks_steps_is_the_plain_cache(setup, monkeypatch, cache):
    model, mask_id, prompts, attention = setup
    plain = generate(model, prompts, attention_mask=attention, mask_id=mask_id, gen_length=GEN, steps=GEN,
                     block_length=BLOCK, cache=cache)
    never, _ = decode(setup, monkeypatch, cache, BLOCK)  # a block has BLOCK steps: BLOCK - 1 later ones
    assert torch.equal(never.sequences, plain.sequences)


def test_every_second_step_runs_the_whole_sequence(setup, monkeypatch):
    _, lengths = decode(setup, monkeypatch, "prefix", 2)
    full = PLEN + GEN
    # Per block (4 steps): its first step and its second later step run everything; the others the window, which
    # for the prefix cache is the block and all after it.
    want = [n for b in range(GEN // BLOCK) for n in (full, full - PLEN - b * BLOCK, full, full - PLEN - b * BLOCK)]
    assert lengths == want


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


def test_a_bad_refresh_is_refused(setup):
    model, *_ = setup
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="refresh must be None .* or a whole number of steps >= 1"):
            BlockCache("prefix", model, PLEN, BLOCK, None, refresh=bad)
