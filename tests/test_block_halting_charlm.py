"""Per-block halting on the shipped block-causal model (charlm-block): the exact cache decodes what no cache
decodes, with parallel commits, compaction and the end-of-text stop, in the library and through
``diffexit generate text``."""

import json

import pytest
import torch

from diffexit.dllm import SchED, generate
from diffexit.dllm.charlm.model import load_embedded_block_model
from diffexit.dllm.charlm.tasks import DECODE, layout_of, sample
from diffexit.dllm.charlm.tokenizer import encode_prompts
from diffexit.samplers import ThresholdSchedule


@pytest.fixture(scope="module")
def charlm_block():
    return load_embedded_block_model()


def _decode(model, tok, task_prompts, rule, **kw):
    layout = layout_of(task_prompts[0][0])
    ids, mask = encode_prompts(tok, [p for _, p in task_prompts], layout.prompt_length)
    _, steps = DECODE[layout.span_length]  # the block length is the model's own
    return generate(model, ids, attention_mask=mask, gen_length=layout.span_length, steps=steps,
                    block_length=model.config.block_length, mask_id=tok.mask_token_id, halting=rule,
                    eos_token_ids=[tok.eos_token_id], **kw)


@pytest.mark.parametrize("stat,parallel", [("min", None), ("quantile", 0.9), ("mean", 0.9)])
def test_short_tasks_cached_equal_uncached(charlm_block, stat, parallel):
    # pick, zip and trio answers end in different blocks, so in one batch the samples stop at the all-EOS block
    # after their answer at different blocks, and halt their blocks at different steps.
    model, tok = charlm_block
    items = [(task, ex.prompt) for task in ("pick", "zip", "trio") for ex in sample(task, "heldout", 3, 4)]
    rule = lambda: SchED(ThresholdSchedule("cosine", 7.5, 2.5), stat=stat)
    plain = _decode(model, tok, items, rule(), parallel_threshold=parallel, return_trace=True)
    cached = _decode(model, tok, items, rule(), parallel_threshold=parallel, cache="prefix", return_trace=True)
    assert torch.equal(plain.sequences, cached.sequences)
    assert torch.equal(plain.nfe, cached.nfe) and torch.equal(plain.halt_step, cached.halt_step)
    assert len(set(plain.nfe.tolist())) > 2
    stopped = [next((s.step for s in t if s.stopped), None) for t in plain.trace]
    assert stopped == [next((s.step for s in t if s.stopped), None) for t in cached.trace]
    assert sum(s is not None for s in stopped) >= 8  # pick and zip at least
    assert int(plain.nfe.max()) < 16


def test_chain_cached_equals_uncached(charlm_block):
    model, tok = charlm_block
    items = [("chain", ex.prompt) for ex in sample("chain", "heldout", 0, 3)]
    rule = lambda: SchED(ThresholdSchedule("cosine", 7.5, 2.5), stat="min")
    plain = _decode(model, tok, items, rule(), parallel_threshold=0.9)
    cached = _decode(model, tok, items, rule(), parallel_threshold=0.9, cache="prefix")
    assert torch.equal(plain.sequences, cached.sequences) and torch.equal(plain.nfe, cached.nfe)
    assert int(plain.nfe.max()) < 136


@pytest.mark.parametrize("seed", [0, 1])
def test_generate_text_with_the_cache_gives_the_answers_of_no_cache(tmp_path, seed):
    from diffexit.app.generate_text import main

    runs = {}
    for cache in ("none", "prefix"):
        out = tmp_path / cache
        args = ["--model", "charlm-block", "--task", "zip", "--n", "6", "--seed", str(seed), "--method", "sched",
                "--cache", cache, "--batch-size", "3", "--out", str(out)]
        assert main(args) == 0
        runs[cache] = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    strip = lambda records: [(r["id"], r["output"], r["nfe"], r["halt_step"]) for r in records]
    assert strip(runs["none"]) == strip(runs["prefix"])
    assert all(r["nfe"] < 16 for r in runs["prefix"])
