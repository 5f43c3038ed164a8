"""``generate(cache=...)``: Fast-dLLM's prefix and dual caches, re-derived by hand, composed with halting and
parallel commits, batched like single samples; and the errors for models and settings they cannot serve."""

from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from diffexit.dllm import Prophet, SchED, generate
from diffexit.samplers import ThresholdSchedule

GEN, BLOCK, PLEN = 12, 4, 5


@pytest.fixture(scope="module")
def setup(tiny_text_model):
    model, tok = tiny_text_model(max_positions=32, initializer_range=0.5, never_predict_mask=True)
    prompts = torch.randint(10, 60, (3, PLEN), generator=torch.Generator().manual_seed(0))
    return model, tok.mask_token_id, prompts, torch.ones_like(prompts)


def decode(model, mask_id, prompts, attention, **kw):
    kw = {"gen_length": GEN, "steps": GEN, "block_length": BLOCK, **kw}
    return generate(model, prompts, attention_mask=attention, mask_id=mask_id, **kw)


@pytest.mark.parametrize("kind", ["prefix", "dual"])
def test_a_blocks_first_step_is_the_uncached_forward(setup, kind, recorder):
    model, mask_id, prompts, attention = setup
    rec = recorder(model)
    decode(rec, mask_id, prompts, attention, cache=kind)
    full = [c for c in rec.calls if c.ids.shape[1] == PLEN + GEN]
    assert len(full) == GEN // BLOCK  # one per block, the rest ran against the cache
    for call in full:
        assert torch.equal(call.logits, model(call.ids, attention_mask=call.kwargs["attention_mask"]).logits)


@pytest.mark.parametrize("kind", ["prefix", "dual"])
def test_later_steps_equal_a_forward_with_the_blocks_kv_fed_in_by_hand(setup, kind, recorder):
    model, mask_id, prompts, attention = setup
    rec = recorder(model)
    decode(rec, mask_id, prompts, attention, cache=kind)
    checked = 0
    for block in range(GEN // BLOCK):
        start, end = PLEN + block * BLOCK, PLEN + (block + 1) * BLOCK
        first = [c for c in rec.calls if c.ids.shape[1] == PLEN + GEN][block]
        kv = model(first.ids, attention_mask=first.kwargs["attention_mask"], use_cache=True).cache
        later = [c for c in rec.calls if c.ids.shape[1] == (BLOCK if kind == "dual" else PLEN + GEN - start)]
        later = [c for c in later if int(c.kwargs["position_ids"][0, 0]) == start]
        for call in later:
            cache = DynamicCache(config=model.config)
            keep = list(range(start)) + (list(range(end, PLEN + GEN)) if kind == "dual" else [])
            for i, layer in enumerate(kv.layers):
                cache.update(layer.keys[:, :, keep], layer.values[:, :, keep], i)
            window = call.ids  # what the step ran: the block (and, for prefix, what follows it)
            mask = torch.ones(len(window), len(keep) + window.shape[1], dtype=torch.long)
            positions = torch.arange(start, start + window.shape[1])[None]
            want = model(window, attention_mask=mask, position_ids=positions, cache=cache).logits
            assert torch.allclose(call.logits, want, atol=1e-6)
            checked += 1
    assert checked == GEN - GEN // BLOCK


@pytest.mark.parametrize("kind", ["prefix", "dual"])
@pytest.mark.parametrize("extra", [
    {},
    {"parallel_threshold": 0.3},
    {"halting": "sched"},
    {"halting": "sched", "parallel_threshold": 0.3},
    {"halting": "prophet"},
])
def test_a_batch_decodes_as_each_sample_alone(setup, kind, extra):
    model, mask_id, prompts, attention = setup

    def rule():
        if extra.get("halting") == "sched":
            return SchED(ThresholdSchedule("linear", 2.0, 0.5), stat="min")
        return Prophet(thresholds=(2.0, 1.0, 0.5)) if extra.get("halting") == "prophet" else None

    kw = {k: v for k, v in extra.items() if k != "halting"}
    together = decode(model, mask_id, prompts, attention, cache=kind, halting=rule(), **kw)
    for j in range(len(prompts)):
        alone = decode(model, mask_id, prompts[j:j + 1], attention[j:j + 1], cache=kind, halting=rule(), **kw)
        assert torch.equal(together.sequences[j], alone.sequences[0])
        assert together.nfe[j] == alone.nfe[0] and together.halt_step[j] == alone.halt_step[0]
    if "halting" in extra or "parallel_threshold" in extra:
        assert together.nfe.min() < GEN  # the settings do cut steps, so the comparison covers compaction


def test_parallel_commits_with_a_cache_desynchronise_blocks_and_still_fill_everything(setup):
    model, mask_id, prompts, attention = setup
    out = decode(model, mask_id, prompts, attention, cache="dual", parallel_threshold=0.3)
    assert (out.generated != mask_id).all() and len(set(out.nfe.tolist())) > 1


def test_a_transformers_llama_takes_the_cache_too(tiny_llama):
    prompts = torch.randint(0, 39, (2, PLEN), generator=torch.Generator().manual_seed(1))
    plain = generate(tiny_llama, prompts, gen_length=GEN, steps=GEN, block_length=BLOCK, mask_id=39)
    cached = generate(tiny_llama, prompts, gen_length=GEN, steps=GEN, block_length=BLOCK, mask_id=39,
                      cache="prefix")
    assert (cached.generated != 39).all() and torch.equal(cached.sequences[:, :PLEN], plain.sequences[:, :PLEN])


def test_the_first_block_of_a_cached_decode_starts_like_the_uncached_one(setup):
    model, mask_id, prompts, attention = setup
    plain = decode(model, mask_id, prompts, attention, return_trace=True)
    cached = decode(model, mask_id, prompts, attention, cache="prefix", return_trace=True)
    # Step 0 is a full forward in both: the first commit is the same.
    assert [t[0].tokens for t in plain.trace] == [t[0].tokens for t in cached.trace]


@pytest.mark.parametrize("kw, message", [
    ({"cache": "full"}, "cache must be None or one of"),
    ({"cache": "dual", "block_length": GEN}, "nothing after it"),
    ({"cache": "prefix", "cfg_scale": 1.0}, "classifier-free guidance"),
])
def test_bad_cache_settings_are_refused(setup, kw, message):
    model, mask_id, prompts, attention = setup
    with pytest.raises(ValueError, match=message):
        decode(model, mask_id, prompts, attention, **kw)


def test_a_model_without_a_kv_cache_is_refused_with_the_fix():
    def no_cache(x, attention_mask=None):
        return SimpleNamespace(logits=torch.zeros(x.shape[0], x.shape[1], 40))

    with pytest.raises(ValueError, match="decode it with cache=None"):
        generate(no_cache, torch.ones(1, 3, dtype=torch.long), gen_length=8, steps=8, block_length=4, mask_id=39,
                 cache="prefix")

    class Forgets(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False):
            return SimpleNamespace(logits=torch.zeros(input_ids.shape[0], input_ids.shape[1], 40), cache=None)

    with pytest.raises(ValueError, match="returned no key/value cache"):
        generate(Forgets(), torch.ones(1, 3, dtype=torch.long), gen_length=8, steps=8, block_length=4, mask_id=39,
                 cache="prefix")
