"""The halting oracle against a brute-force search over halting steps, on the embedded models; the recorded full
steps and the commit oracle against a replay; bench text's oracle rows against both, on a scripted model."""

from types import SimpleNamespace

import pytest
import torch

from diffexit.app.bench.text import run_task
from diffexit.app.bench.text_methods import Method, oracle_methods
from diffexit.common.schedules import ThresholdSchedule
from diffexit.dllm import generate
from diffexit.dllm.charlm.model import load_embedded_block_model, load_embedded_text_model
from diffexit.dllm.charlm.tasks import DECODE, layout_of, sample
from diffexit.dllm.charlm.tokenizer import build_tokenizer, encode_prompts
from diffexit.dllm.halting import HaltDecision, HaltingRule, SchED
from diffexit.dllm.oracle import HaltingOracle, Recording, record_full_steps


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


class Scripted(torch.nn.Module):
    """Logits that are a fixed pseudo-random function of the whole sequence: every committed token moves every
    position's logits (by a weight per position), so argmaxes flip from pass to pass and samples halt at
    different passes. The mask token and EOS are never the argmax, so every answer is a full span of letters."""

    def __init__(self, vocab: int, length: int, banned: list[int]):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.base = torch.randn(length, vocab, generator=g) * 2
        self.mix = torch.randn(vocab, vocab, generator=g) * 4
        self.weight = torch.rand(length, 1, generator=g) * 1.5
        self.banned = banned
        self.config = SimpleNamespace(vocab_size=vocab)

    def forward(self, x, attention_mask=None):
        context = torch.nn.functional.one_hot(x, self.base.shape[1]).float().mean(1) @ self.mix
        logits = self.base[None, :x.shape[1]] + self.weight[None, :x.shape[1]] * context[:, None]
        logits[..., self.banned] = float("-inf")
        return SimpleNamespace(logits=logits)


def _scripted(task: str):
    tok = build_tokenizer()
    layout = layout_of(task)
    model = Scripted(len(tok), layout.seq_length, [tok.mask_token_id, tok.eos_token_id])
    return model, tok, layout


def _commit_passes_by_replay(model, tok, ids, kw) -> list[int]:
    """The commit oracle re-derived: replay the full-steps trace (each pass sees the span the previous pass left),
    take each pass's argmax from the model directly, and find each position's first pass from which its argmax is
    its final token up to the pass that committed it; count the distinct passes per sample."""
    out = generate(model, ids, return_trace=True, **kw)
    span, plen = kw["gen_length"], ids.shape[1]
    passes = []
    for b, steps in enumerate(out.trace):
        inputs = [[kw["mask_id"]] * span] + [t.tokens for t in steps[:-1]]
        tops = [model(torch.cat([ids[b], torch.tensor(x)])[None]).logits[0, plen:].argmax(-1).tolist()
                for x in inputs]
        final = out.generated[b].tolist()
        firsts = set()
        for i in range(span):
            last = max(t for t, x in enumerate(inputs) if x[i] == kw["mask_id"])
            first = last
            while first > 0 and tops[first - 1][i] == final[i]:
                first -= 1
            firsts.add(first)
        passes.append(len(firsts))
    return passes


def test_a_recording_is_the_full_steps_decode_pass_by_pass():
    model, tok, layout = _scripted("pick")
    ids, kw = _batch(tok, "pick", 5)
    rec = record_full_steps(model, ids, **kw)
    assert torch.equal(rec.final, generate(model, ids, **kw).generated)
    assert rec.stats.top1_id.shape == rec.masked.shape == (kw["steps"], 5, kw["gen_length"])
    assert rec.masked[0].all() and rec.masked.sum((0, 2)).tolist() == [sum(range(1, 17))] * 5
    assert rec.commit_oracle_nfe().tolist() == _commit_passes_by_replay(model, tok, ids, kw)
    with pytest.raises(ValueError, match="drop cache='prefix'"):
        record_full_steps(model, ids, cache="prefix", **kw)


# Thresholds fitted to the scripted model's margins (minimum 0-0.5, mean 0.1-1.3), so samples halt at different
# passes and some answers change.
@pytest.mark.parametrize("rule", [
    lambda rec: HaltAt(3),
    lambda rec: SchED(ThresholdSchedule("constant", 0.1, 0.1), stat="min"),
    lambda rec: SchED(ThresholdSchedule("constant", 1.15, 1.15)),
    lambda rec: SchED(ThresholdSchedule("linear", 1.3, 0.0), patience=1, max_change_ratio=0.5),
    lambda rec: HaltingOracle(rec.final),
], ids=["halt-at", "min", "mean", "mean-patience", "oracle"])
def test_a_replayed_rule_halts_where_the_decode_does(rule):
    model, tok, layout = _scripted("pick")
    ids, kw = _batch(tok, "pick", 5)
    rec = record_full_steps(model, ids, **kw)
    nfe, kept = rec.replay(rule(rec))
    out = generate(model, ids, halting=rule(rec), **kw)
    assert nfe.tolist() == out.nfe.tolist()
    assert kept.tolist() == (out.generated == rec.final).all(-1).tolist()
    assert len(set(nfe.tolist())) > 1 or not kept.all()  # the rule is not trivially all-or-nothing
    with pytest.raises(ValueError, match="halts per block"):
        Recording(rec.final, rec.stats, rec.masked, per_block=True).replay(rule(rec))


def test_bench_text_oracle_rows_equal_a_brute_force_search_on_a_scripted_model():
    model, tok, layout = _scripted("pick")
    sched = Method("sched-cosine-min", "sched (min)", {}, halting=lambda: SchED(ThresholdSchedule("cosine", 1.0, 0.0),
                                                                                stat="min"))
    methods = [Method("full", "full", {"steps": "full"}), *oracle_methods(), sched]
    n = 6
    rows = {r["method"]: r for r in run_task(model, tok, "pick", methods, n, 4, SimpleNamespace(update=lambda k: 0))}
    _, kw = _batch(tok, "pick", n)
    # run_task decodes held-out draw 0.
    ids, kw["attention_mask"] = encode_prompts(tok, [e.prompt for e in sample("pick", "heldout", 0, n)],
                                               layout.prompt_length)
    final = generate(model, ids, **kw).generated
    first = torch.full((n,), -1)
    for h in range(kw["steps"]):
        keeps = (generate(model, ids, halting=HaltAt(h), **kw).generated == final).all(-1)
        first = torch.where((first < 0) & keeps, torch.full_like(first, h), first)
    assert 1 < len(set(first.tolist())) and (first >= 0).all()  # the samples halt at different passes
    oracle = rows["oracle-halt"]
    assert oracle["nfe"] == pytest.approx(float((first + 1).float().mean()))
    assert oracle["agreement"] == 1.0 and oracle["passes_over_oracle"] == 1.0 and oracle["seconds"] > 0
    commit = rows["oracle-commit"]
    assert commit["nfe"] == pytest.approx(sum(_commit_passes_by_replay(model, tok, ids, kw)) / n)
    assert commit["agreement"] == 1.0 and commit["seconds"] is None and commit["speedup_wall"] is None
    assert "not a bound" in commit["params"]["oracle"]
    assert rows["sched-cosine-min"]["passes_over_oracle"] == pytest.approx(rows["sched-cosine-min"]["nfe"]
                                                                           / oracle["nfe"])
    assert rows["full"]["passes_over_oracle"] is None and rows["oracle-commit"]["passes_over_oracle"] is None
    assert {r["family"] for r in rows.values()} == {"full", "oracle-halt", "oracle-commit", "sched (min)"}
