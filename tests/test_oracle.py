"""The halting oracle against a brute-force search over halting steps, on the embedded models."""

import pytest
import torch

from diffexit.dllm import generate
from diffexit.dllm.charlm.model import load_embedded_block_model, load_embedded_text_model
from diffexit.dllm.charlm.tasks import DECODE, layout_of, sample
from diffexit.dllm.charlm.tokenizer import encode_prompts
from diffexit.dllm.halting import HaltDecision, HaltingRule
from diffexit.dllm.oracle import HaltingOracle


class HaltAt(HaltingRule):
    """Halt every sample at nominal step ``h`` (and never before)."""

    def __init__(self, h: int):
        self.h = h

    def decide(self, stats, masked, step, rows):
        halt = step == self.h
        return HaltDecision(halt, torch.zeros(len(rows)), torch.zeros(len(rows)))


def _batch(tok, task: str, n: int):
    layout = layout_of(task)
    block_length, steps = DECODE[layout.span_length]
    ids, mask = encode_prompts(tok, [e.prompt for e in sample(task, "heldout", 3, n)], layout.prompt_length)
    return ids, dict(attention_mask=mask, gen_length=layout.span_length, steps=steps, block_length=block_length,
                     mask_id=tok.mask_token_id)


@pytest.mark.parametrize("task", ["pick", "trio"])
def test_the_oracle_halts_at_the_first_step_a_brute_force_search_finds(task):
    model, tok = load_embedded_text_model()
    ids, kw = _batch(tok, task, 6)
    final = generate(model, ids, **kw).generated
    oracle = generate(model, ids, halting=HaltingOracle(final), **kw)
    assert torch.equal(oracle.generated, final)
    # Brute force: the earliest step h at which halting every sample keeps its answer, per sample.
    first = torch.full((ids.shape[0],), -1)
    for h in range(kw["steps"]):
        keeps = (generate(model, ids, halting=HaltAt(h), **kw).generated == final).all(-1)
        first = torch.where((first < 0) & keeps, torch.full_like(first, h), first)
        if (first >= 0).all():
            break
    assert (first >= 0).all()
    assert oracle.nfe.tolist() == (first + 1).tolist()
    assert (oracle.nfe < kw["steps"]).any()  # the search is not vacuous: some sample halts early


def test_on_a_block_causal_model_the_oracle_halts_per_block_and_keeps_every_answer():
    model, tok = load_embedded_block_model()
    ids, kw = _batch(tok, "zip", 8)
    kw["block_length"] = 4
    final = generate(model, ids, **kw).generated
    for cache in (None, "prefix"):
        oracle = generate(model, ids, halting=HaltingOracle(final), cache=cache, **kw)
        assert torch.equal(oracle.generated, final)
        assert (oracle.nfe <= kw["steps"]).all() and (oracle.nfe < kw["steps"]).any()


def test_answers_of_other_prompts_are_refused():
    model, tok = load_embedded_text_model()
    ids, kw = _batch(tok, "pick", 4)
    with pytest.raises(ValueError, match="record final with the same prompts and lengths"):
        generate(model, ids, halting=HaltingOracle(torch.zeros(3, 16, dtype=torch.long)), **kw)
    with pytest.raises(ValueError, match="long tensor"):
        HaltingOracle(torch.zeros(4, 16))
