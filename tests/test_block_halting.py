"""Halting and commits per block on a block-causal model (diffexit.dllm.block_decoding): what the rule sees, that
a halted block is filled and the next one runs, that an all-EOS block ends the sample, and that the exact cache
decodes what no cache decodes, against a one-sample-at-a-time re-derivation."""

from types import SimpleNamespace

import pytest
import torch

from diffexit.dllm import HaltDecision, HaltingRule, Prophet, SchED, generate
from diffexit.dllm.charlm.model import DiffusionLlama, text_model_config
from diffexit.dllm.charlm.tokenizer import build_tokenizer, encode_prompts
from diffexit.kernels import token_stats
from diffexit.samplers import ThresholdSchedule

PROMPT, BLOCK, SPAN = 8, 4, 16
BLOCKS = SPAN // BLOCK
PROMPTS = ["rev:ab", "rev:abc", "add:1+2", "p:a", "x", "zz:q", "a", "bcd", "q:zz", "rev:xyz"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def eos_model(tok, seed=2):
    """A tiny random block-causal model whose positions after block 0 lean towards EOS: with this seed the samples
    halt their blocks at different steps and block 2 comes out all EOS."""
    torch.manual_seed(seed)
    cfg = text_model_config(len(tok), tok.pad_token_id, hidden_size=32, num_layers=2, num_heads=4, max_positions=32,
                            block_length=BLOCK, prompt_length=PROMPT)
    model = DiffusionLlama(cfg).eval()
    model.lm_head.weight.data *= 20
    direction = torch.randn(32)
    direction /= direction.norm()
    model.position_embedding.weight.data[PROMPT + BLOCK:] += 0.05 * direction
    model.lm_head.weight.data[tok.eos_token_id] = 20 * direction
    return model


def sched(high=2.0, low=0.5, **kw):
    return SchED(ThresholdSchedule("cosine", high, low), stat=kw.pop("stat", "min"), **kw)


def _decode(model, tok, rule, cache=None, parallel=None, eos=True, prompts=PROMPTS, trace=False, steps=SPAN):
    ids, mask = encode_prompts(tok, list(prompts), PROMPT)
    return generate(model, ids, attention_mask=mask, gen_length=SPAN, steps=steps, block_length=BLOCK,
                    mask_id=tok.mask_token_id, halting=rule, cache=cache, parallel_threshold=parallel,
                    eos_token_ids=[tok.eos_token_id] if eos else (), return_trace=trace)


def reference(model, tok, make_rule, prompt, parallel=None, steps=SPAN):
    """One sample, uncached, written out block by block: a fresh rule per block shown only the block; a halted
    block gets the step's argmax; an all-EOS block fills the rest of the span with EOS. ``(span, passes)``."""
    ids, mask = encode_prompts(tok, [prompt], PROMPT)
    x = torch.cat([ids, torch.full((1, SPAN), tok.mask_token_id)], 1)
    mask = torch.cat([mask, torch.ones(1, SPAN, dtype=torch.long)], 1)
    per_block = steps // BLOCKS
    base, rem = divmod(BLOCK, per_block)
    counts = [base + (i < rem) for i in range(per_block)]
    passes = 0
    for b in range(BLOCKS):
        cols = slice(PROMPT + b * BLOCK, PROMPT + (b + 1) * BLOCK)
        rule = make_rule()
        rule.start(1, BLOCK, "cpu", per_block)
        for s in range(per_block):
            with torch.no_grad():
                logits = model(x, attention_mask=mask).logits[:, cols]
            passes += 1
            stats = token_stats(logits)
            masked = x[:, cols] == tok.mask_token_id
            block = x[0, cols]
            if rule.decide(stats, masked, torch.tensor([s]), torch.tensor([0])).halt[0]:
                block[masked[0]] = stats.top1_id[0][masked[0]]
                break
            prob = torch.softmax(logits[0].double(), -1).max(-1).values
            conf = torch.where(masked[0], prob, torch.tensor(float("-inf"), dtype=torch.float64))
            k = min(counts[s], int(masked.sum()))
            pick = torch.zeros(BLOCK, dtype=torch.bool)
            pick[torch.topk(conf, k).indices] = k > 0
            if parallel is not None:
                pick |= conf >= parallel
            block[pick] = stats.top1_id[0][pick]
            if not (block == tok.mask_token_id).any():
                break
        if (x[0, cols] == tok.eos_token_id).all() and b + 1 < BLOCKS:
            x[0, PROMPT + (b + 1) * BLOCK:] = tok.eos_token_id
            break
    return x[0, PROMPT:], passes


# cached == uncached == the re-derivation --------------------------------------------------------------------------

@pytest.mark.parametrize("parallel", [None, 0.3])
@pytest.mark.parametrize("stat", ["min", "mean"])
def test_per_block_halting_cached_equals_uncached_equals_reference(tok, parallel, stat):
    # Padded prompts of several lengths in one batch; the samples halt their blocks at different steps, so with the
    # cache the batch is split by block, and it is compacted as samples stop (at the all-EOS block 2).
    model = eos_model(tok)
    plain = _decode(model, tok, sched(stat=stat), parallel=parallel, trace=True)
    cached = _decode(model, tok, sched(stat=stat), cache="prefix", parallel=parallel, trace=True)
    assert torch.equal(plain.sequences, cached.sequences)
    assert torch.equal(plain.nfe, cached.nfe) and torch.equal(plain.halt_step, cached.halt_step)
    fields = lambda out: [[(s.step, s.committed, s.masked_before, s.halted, s.stopped, s.tokens) for s in t]
                          for t in out.trace]
    assert fields(plain) == fields(cached)
    assert len(set(plain.nfe.tolist())) > 1  # the samples halted at different steps
    assert (plain.halt_step >= 0).all()
    for i, prompt in enumerate(PROMPTS):
        span, passes = reference(model, tok, lambda: sched(stat=stat), prompt, parallel)
        assert torch.equal(plain.generated[i], span), prompt
        assert int(plain.nfe[i]) == passes, prompt


def test_samples_stop_at_different_blocks_on_the_tiny_model(tok):
    # Without the EOS lean, no block is all EOS: samples run every block, halting per block, cached or not.
    torch.manual_seed(0)
    cfg = text_model_config(len(tok), tok.pad_token_id, hidden_size=32, num_layers=2, num_heads=4, max_positions=32,
                            block_length=BLOCK, prompt_length=PROMPT)
    model = DiffusionLlama(cfg).eval()
    model.lm_head.weight.data *= 20
    rule = lambda: sched(1.5, 0.2, stat="quantile")
    plain, cached = _decode(model, tok, rule()), _decode(model, tok, rule(), cache="prefix")
    assert torch.equal(plain.sequences, cached.sequences) and torch.equal(plain.nfe, cached.nfe)
    assert (plain.generated != tok.mask_token_id).all()
    assert int(plain.nfe.min()) < SPAN and len(set(plain.nfe.tolist())) > 1
    for i, prompt in enumerate(PROMPTS[:4]):
        span, passes = reference(model, tok, rule, prompt)
        assert torch.equal(plain.generated[i], span) and int(plain.nfe[i]) == passes


# what the rule sees ------------------------------------------------------------------------------------------------

class Recorder(HaltingRule):
    """Records what it is shown; halts every block at its step ``halt_at``."""

    def __init__(self, halt_at):
        self.halt_at, self.seen = halt_at, []

    def start(self, batch_size, span_length, device, total_steps):
        super().start(batch_size, span_length, device, total_steps)
        self.started = (batch_size, span_length, total_steps)

    def decide(self, stats, masked, step, rows):
        self.seen.append(SimpleNamespace(shape=tuple(stats.logit_margin.shape), masked=masked.clone(),
                                         step=step.clone(), progress=self.progress(step), rows=rows.clone(),
                                         margin=stats.logit_margin.clone(), argmax=stats.top1_id.clone()))
        halt = step == self.halt_at
        return HaltDecision(halt=halt, value=stats.logit_margin.mean(-1), threshold=torch.zeros(len(step)))


@pytest.mark.parametrize("cache", [None, "prefix"])
def test_the_rule_sees_the_block_only_and_its_progress_restarts(tok, cache):
    model = eos_model(tok, seed=0)
    prompts = PROMPTS[:3]
    rule = Recorder(halt_at=1)
    out = _decode(model, tok, rule, cache=cache, eos=False, prompts=prompts, trace=True)
    per_block = SPAN // BLOCKS
    assert rule.started == (len(prompts) * BLOCKS, BLOCK, per_block)
    assert out.nfe.tolist() == [2 * BLOCKS] * len(prompts)  # every block halts at its second step
    for n, seen in enumerate(rule.seen):
        block, step = divmod(n, 2)
        assert seen.shape == (len(prompts), BLOCK)
        assert seen.step.tolist() == [step] * len(prompts)
        torch.testing.assert_close(seen.progress, torch.full((len(prompts),), step / (per_block - 1)))
        assert seen.rows.tolist() == [i * BLOCKS + block for i in range(len(prompts))]
        assert seen.masked.sum(-1).tolist() == [BLOCK - step] * len(prompts)  # one commit per step before
    # Re-derived: the margins shown are those of a full forward pass over the sequence before the step, at the
    # current block, and the halted block holds that step's argmax where it was masked.
    ids, mask = encode_prompts(tok, prompts, PROMPT)
    full_mask = torch.cat([mask, torch.ones(len(prompts), SPAN, dtype=torch.long)], 1)
    for n, seen in enumerate(rule.seen):
        block, step = divmod(n, 2)
        spans = torch.tensor([t[n - 1].tokens if n else [tok.mask_token_id] * SPAN for t in out.trace])
        with torch.no_grad():
            logits = model(torch.cat([ids, spans], 1), attention_mask=full_mask).logits
        cols = slice(PROMPT + block * BLOCK, PROMPT + (block + 1) * BLOCK)
        torch.testing.assert_close(seen.margin, token_stats(logits[:, cols]).logit_margin, atol=1e-4, rtol=1e-4)
        if step == 1:
            after = torch.tensor([t[n].tokens for t in out.trace])[:, block * BLOCK:(block + 1) * BLOCK]
            assert torch.equal(after[seen.masked], seen.argmax[seen.masked])
    # A halted block is filled and only it: the next pass runs the next block with every later position masked.
    for t in out.trace:
        for n in range(1, 2 * BLOCKS - 1, 2):
            assert t[n].halted and t[n].committed == BLOCK - 1
            filled = (n + 1) // 2 * BLOCK
            assert t[n + 1].masked_before == SPAN - filled
            assert tok.mask_token_id not in t[n].tokens[:filled]
            assert set(t[n].tokens[filled:]) == {tok.mask_token_id}
            assert t[n].progress == pytest.approx(1 / (per_block - 1)) and t[n + 1].progress == 0.0


@pytest.mark.parametrize("cache", [None, "prefix"])
def test_sched_patience_starts_afresh_in_every_block(tok, cache):
    # Any change counts as stable and the threshold always passes, so patience 1 halts a block at its second step,
    # never its first: its first step has no previous argmax of its own. Had the state run on across blocks, each
    # later block's first step would compare against the previous block's argmax, and halt there.
    model = eos_model(tok, seed=0)
    rule = SchED(ThresholdSchedule("constant", -1e9, -1e9), stat="min", patience=1, max_change_ratio=1.0)
    out = _decode(model, tok, rule, cache=cache, eos=False, prompts=PROMPTS[:4], trace=True)
    assert out.nfe.tolist() == [2 * BLOCKS] * 4
    for t in out.trace:
        assert [s.halted for s in t] == [False, True] * BLOCKS


# an all-EOS block ends the sample ------------------------------------------------------------------------------------

class Scripted(torch.nn.Module):
    """A block-causal stand-in: sample with code ``c`` (its last prompt token minus 4) predicts, with margin 10,
    letter ``a + b`` in blocks ``b < c``, EOS in block ``c`` and the letter ``z`` after it."""

    def __init__(self, tok):
        super().__init__()
        self.tok, self.calls = tok, 0
        self.config = SimpleNamespace(block_length=BLOCK, prompt_length=PROMPT, vocab_size=len(tok))

    def forward(self, input_ids, attention_mask=None, **_):
        self.calls += 1
        code = input_ids[:, PROMPT - 1] - 4
        block = (torch.arange(input_ids.shape[1]) - PROMPT).clamp(min=0) // BLOCK
        letter = lambda c: self.tok.convert_tokens_to_ids(c)
        target = torch.where(block[None] < code[:, None], letter("a") + block[None],
                             torch.where(block[None] == code[:, None], self.tok.eos_token_id, letter("z")))
        logits = torch.zeros(*input_ids.shape, len(self.tok))
        return SimpleNamespace(logits=logits.scatter(-1, target[..., None], 10.0))


def _scripted_ids(tok, codes):
    ids = torch.full((len(codes), PROMPT), tok.convert_tokens_to_ids("q"))
    ids[:, -1] = torch.tensor(codes) + 4
    return ids


def test_an_all_eos_block_stops_the_sample_and_fills_the_rest_with_eos(tok):
    model = Scripted(tok)
    codes = [1, 2, 3, 4]
    kw = dict(gen_length=SPAN, steps=SPAN, block_length=BLOCK, mask_id=tok.mask_token_id,
              halting=SchED(ThresholdSchedule("constant", 5.0, 5.0), stat="min"), return_trace=True)
    out = generate(model, _scripted_ids(tok, codes), eos_token_ids=[tok.eos_token_id, tok.pad_token_id], **kw)
    # Every block halts at its first step; code c's block c is all EOS: it stops there (the last block ends
    # the sample anyway).
    assert out.nfe.tolist() == [2, 3, 4, 4]
    eos, z = tok.eos_token_id, tok.convert_tokens_to_ids("z")
    for i, c in enumerate(codes):
        span = out.generated[i].view(BLOCKS, BLOCK)
        for b in range(BLOCKS):
            want = tok.convert_tokens_to_ids("a") + b if b < c else eos
            assert (span[b] == want).all(), (c, b)
        last = out.trace[i][-1]
        assert last.halted and last.stopped == (c < BLOCKS - 1)
        assert last.committed == (SPAN - c * BLOCK if c < BLOCKS - 1 else BLOCK)
        assert sum(s.committed for s in out.trace[i]) == SPAN
    # Without end-of-text ids the sample runs on, and the model's later blocks are kept.
    plain = generate(model, _scripted_ids(tok, codes), **kw)
    assert plain.nfe.tolist() == [4, 4, 4, 4]
    assert (plain.generated[0, 2 * BLOCK:] == z).all()


def test_the_eos_stop_applies_when_blocks_end_by_their_steps_and_not_without_a_rule(tok):
    model = Scripted(tok)
    kw = dict(gen_length=SPAN, steps=SPAN, block_length=BLOCK, mask_id=tok.mask_token_id,
              eos_token_ids=[tok.eos_token_id])
    never = SchED(ThresholdSchedule("constant", 1e9, 1e9), stat="min")
    out = generate(model, _scripted_ids(tok, [1, 4]), halting=never, **kw)
    assert out.nfe.tolist() == [2 * BLOCK, SPAN] and out.halt_step.tolist() == [-1, -1]
    assert (out.generated[0, BLOCK:] == tok.eos_token_id).all()
    # Full steps stay full steps.
    full = generate(model, _scripted_ids(tok, [1, 4]), **kw)
    assert full.nfe.tolist() == [SPAN, SPAN]


def test_bad_eos_ids_are_refused(tok):
    model = Scripted(tok)
    for bad in ([tok.mask_token_id], [-1], ["[EOS]"]):
        with pytest.raises(ValueError, match="eos_token_ids must be token ids"):
            generate(model, _scripted_ids(tok, [1]), gen_length=SPAN, steps=SPAN, block_length=BLOCK,
                     mask_id=tok.mask_token_id, eos_token_ids=bad)


@pytest.mark.parametrize("cache", [None, "prefix"])
def test_prophet_is_refused_on_a_block_causal_model_before_any_forward(tok, cache):
    model = Scripted(tok)
    with pytest.raises(ValueError, match=r"use SchED\(\.\.\.\), which decides per block"):
        generate(model, _scripted_ids(tok, [1]), gen_length=SPAN, steps=SPAN, block_length=BLOCK,
                 mask_id=tok.mask_token_id, halting=Prophet(), cache=cache)
    assert model.calls == 0
