"""The decoding loops: LLaDA reference equivalence, halting semantics, per-sample batching, Dream's shift, errors."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from diffexit.dllm import Prophet, SchED, dream_generate, generate
from diffexit.samplers import ThresholdSchedule

VOCAB, MASK = 40, 39


@pytest.fixture
def tiny_model(tiny_llama):
    return tiny_llama


def reference_llada(model, prompt, steps, gen_length, block_length, mask_id):
    """LLaDA's greedy low-confidence algorithm, re-derived from its description, one sample-row loop at a time."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt.shape[1]] = prompt
    num_blocks = gen_length // block_length
    per_block = steps // num_blocks
    for nb in range(num_blocks):
        start = prompt.shape[1] + nb * block_length
        end = start + block_length
        n_masked = (x[:, start:end] == mask_id).sum(1)
        counts = torch.stack([torch.tensor([n // per_block + (1 if i < n % per_block else 0)
                                            for i in range(per_block)]) for n in n_masked.tolist()])
        for i in range(per_block):
            mask_index = x == mask_id
            logits = model(x).logits
            x0 = logits.argmax(-1)
            p = F.softmax(logits.double(), dim=-1).gather(-1, x0[..., None]).squeeze(-1)
            p[:, end:] = -float("inf")
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, p, torch.tensor(-float("inf")))
            for j in range(x.shape[0]):
                _, sel = torch.topk(conf[j], k=int(counts[j, i]))
                x[j, sel] = x0[j, sel]
    return x


@pytest.mark.parametrize("steps,gen_length,block_length", [(8, 8, 8), (8, 16, 4), (6, 12, 4), (12, 8, 4)])
def test_greedy_matches_llada_reference(tiny_model, steps, gen_length, block_length):
    torch.manual_seed(1)
    prompt = torch.randint(0, MASK, (3, 5))
    expected = reference_llada(tiny_model, prompt, steps, gen_length, block_length, MASK)
    out = generate(tiny_model, prompt, gen_length=gen_length, steps=steps, block_length=block_length, mask_id=MASK)
    assert torch.equal(out.sequences, expected)
    assert out.nfe.tolist() == [steps] * 3
    assert (out.generated != MASK).all()


class Saturated:
    """Margins of 20-30 nats: float32 probabilities all round to 1.0, float64 ones still rank the positions."""

    def __call__(self, x, attention_mask=None):
        n = x.shape[1]
        logits = torch.zeros(x.shape[0], n, VOCAB)
        for i in range(n):
            logits[:, i, 1 + i % 7] = 20.0 + (i * 7 % 11)
        return SimpleNamespace(logits=logits)


def test_greedy_matches_reference_when_probabilities_saturate():
    prompt = torch.tensor([[3, 4, 5]])
    expected = reference_llada(Saturated(), prompt, steps=4, gen_length=8, block_length=8, mask_id=MASK)
    out = generate(Saturated(), prompt, gen_length=8, steps=4, mask_id=MASK, return_trace=True)
    assert torch.equal(out.sequences, expected)
    # The first step commits the two most confident positions, which float32 could not tell apart.
    first = [i for i, t in enumerate(out.trace[0][0].tokens) if t != MASK]
    margins = [20.0 + ((i + 3) * 7 % 11) for i in range(8)]
    assert sorted(first) == sorted(sorted(range(8), key=lambda i: -margins[i])[:2])


def test_positions_after_current_block_never_committed(tiny_model):
    prompt = torch.randint(0, MASK, (2, 4), generator=torch.Generator().manual_seed(3))
    out = generate(tiny_model, prompt, gen_length=12, steps=6, block_length=4, mask_id=MASK, return_trace=True)
    for sample_trace in out.trace:
        for t in sample_trace:
            block = t.step // 2
            after = torch.tensor(t.tokens[(block + 1) * 4:])
            assert (after == MASK).all()


class ScriptedModel:
    """A fake model whose argmax is token 1 everywhere and whose top-1 minus top-2 margin at forward pass n is
    ``margins[n]`` (per sample row of the original batch, keyed by the first prompt token)."""

    def __init__(self, margins_by_row):
        self.margins_by_row = margins_by_row
        self.calls = {r: 0 for r in margins_by_row}

    def __call__(self, x, attention_mask=None):
        logits = torch.zeros(x.shape[0], x.shape[1], VOCAB)
        for j in range(x.shape[0]):
            r = int(x[j, 0])
            n = self.calls[r]
            self.calls[r] += 1
            logits[j, :, 1] = self.margins_by_row[r][n]
            logits[j, :, 2] = 0.0
            logits[j, :, 3:] = -5.0
            logits[j, :, 0] = -5.0
        return logits


def test_sched_halts_at_exactly_the_step_the_rule_implies():
    # Linear schedule 8 -> 0 over 8 steps: thresholds 8, 6.86, 5.71, 4.57, 3.43, 2.29, 1.14, 0.
    schedule = ThresholdSchedule("linear", high=8.0, low=0.0)
    margins = [1.0, 2.0, 3.0, 4.0, 4.6, 5.0, 5.0, 5.0]  # first reaches the threshold at step 4 (4.6 >= 4.57)
    model = ScriptedModel({10: margins})
    prompt = torch.tensor([[10, 11]])
    out = generate(model, prompt, gen_length=8, steps=8, mask_id=MASK, halting=SchED(schedule), return_trace=True)
    assert out.halt_step.tolist() == [4]
    assert out.nfe.tolist() == [5]
    trace = out.trace[0]
    assert [t.halted for t in trace] == [False] * 4 + [True]
    assert trace[4].threshold == pytest.approx(schedule(4 / 7))
    assert trace[4].committed == 8 - 4  # one token per step before, then every remaining mask
    assert (out.generated == 1).all()


def test_fill_on_halt_uses_the_argmax_of_the_halting_step():
    class ArgmaxChanges:
        def __call__(self, x, attention_mask=None):
            step = int((x == MASK).sum() < 8)  # 0 on the first pass, 1 afterwards
            logits = torch.full((x.shape[0], x.shape[1], VOCAB), -5.0)
            logits[..., 5 if step == 0 else 7] = 10.0  # margin 15 >= threshold: halts at once
            return logits

    out = generate(ArgmaxChanges(), torch.tensor([[3, 4]]), gen_length=8, steps=8, mask_id=MASK,
                   halting=SchED(ThresholdSchedule("constant", 1.0, 1.0)))
    assert out.nfe.tolist() == [1]
    assert (out.generated == 5).all()


def test_per_sample_halting_matches_each_sample_alone(tiny_model):
    torch.manual_seed(4)
    prompts = torch.randint(0, MASK, (4, 5))
    rule = lambda: SchED(ThresholdSchedule("linear", high=2.0, low=0.0))
    batch = generate(tiny_model, prompts, gen_length=16, steps=16, block_length=8, mask_id=MASK, halting=rule())
    assert len(set(batch.nfe.tolist())) > 1, "the test needs samples that halt at different steps"
    for i in range(4):
        alone = generate(tiny_model, prompts[i:i + 1], gen_length=16, steps=16, block_length=8, mask_id=MASK,
                         halting=rule())
        assert torch.equal(alone.sequences[0], batch.sequences[i])
        assert alone.nfe[0] == batch.nfe[i]


def test_halted_sample_does_no_more_forward_passes():
    model = ScriptedModel({10: [9.0] * 8, 20: [0.5] * 8})
    prompt = torch.tensor([[10, 1], [20, 1]])
    out = generate(model, prompt, gen_length=8, steps=8, mask_id=MASK,
                   halting=SchED(ThresholdSchedule("constant", 5.0, 5.0)))
    assert model.calls == {10: 1, 20: 8}
    assert out.nfe.tolist() == [1, 8]
    assert out.halt_step.tolist() == [0, -1]


def test_sched_min_progress_and_patience_gate():
    always = ThresholdSchedule("constant", 1.0, 1.0)
    out = generate(ScriptedModel({10: [9.0] * 8}), torch.tensor([[10]]), gen_length=8, steps=8, mask_id=MASK,
                   halting=SchED(always, min_progress=0.5))
    assert out.halt_step.tolist() == [4]  # progress 4/7 is the first >= 0.5
    # Argmax is constant (token 1), so the stability count reaches 2 at the third pass.
    out = generate(ScriptedModel({10: [9.0] * 8}), torch.tensor([[10]]), gen_length=8, steps=8, mask_id=MASK,
                   halting=SchED(always, patience=2))
    assert out.halt_step.tolist() == [2]


def test_prophet_uses_the_answer_window_and_the_reference_phases():
    model = ScriptedModel({10: [6.0] * 9})
    out = generate(model, torch.tensor([[10]]), gen_length=9, steps=9, mask_id=MASK, halting=Prophet(),
                   return_trace=True)
    # The reference's phase is (i + 1) / T with cutoffs 0.33 / 0.67: 7.5 at steps 0-1 of 9, 5.0 from step 2
    # (3/9 = 0.333), so a margin of 6 halts at step 2.
    assert out.halt_step.tolist() == [2]
    assert [t.threshold for t in out.trace[0][:3]] == [7.5, 7.5, 5.0]


def reference_prophet(model, prompt, steps, gen_length, block_length, mask_id, answer_start_pos):
    """Prophet's early exit, re-derived from ``generate_earlyexit.py``: greedy LLaDA steps; before each step's
    commit, the mean top-1 minus top-2 logit over the 5 positions from ``answer_start_pos`` (decoded or not) is
    held against 7.5 / 5.0 / 2.5 by ``global_step / steps`` (1-based) below 0.33, below 0.67, above."""
    x = torch.full((1, prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt.shape[1]] = prompt
    num_blocks = gen_length // block_length
    per_block = steps // num_blocks
    global_step = 0
    for nb in range(num_blocks):
        end = prompt.shape[1] + (nb + 1) * block_length
        n_masked = int((x[:, end - block_length:end] == mask_id).sum())
        counts = [n_masked // per_block + (1 if i < n_masked % per_block else 0) for i in range(per_block)]
        for i in range(per_block):
            global_step += 1
            mask_index = x == mask_id
            logits = model(x).logits
            x0 = logits.argmax(-1)
            window = range(answer_start_pos, min(x.shape[1], answer_start_pos + 5))
            gaps = [float(logits[0, p].topk(2).values[0] - logits[0, p].topk(2).values[1]) for p in window]
            phase = global_step / steps
            limit = 7.5 if phase < 0.33 else 5.0 if phase < 0.67 else 2.5
            if sum(gaps) / len(gaps) >= limit:
                x[mask_index] = x0[mask_index]
                return x, global_step
            p = F.softmax(logits.double(), dim=-1).gather(-1, x0[..., None]).squeeze(-1)
            p[:, end:] = -float("inf")
            conf = torch.where(mask_index, p, torch.tensor(-float("inf")))
            sel = torch.topk(conf[0], k=counts[i]).indices
            x[0, sel] = x0[0, sel]
    return x, steps


def _prophet_against_reference(steps, block_length, answer_start):
    """Asserts that six prompts decode as the reference decodes them; returns whether each halted early."""
    # A model whose margins grow with the committed tokens, so Prophet halts part-way (or never).
    torch.manual_seed(answer_start + steps)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, is_causal=False,
                         initializer_range=1.0)
    llama = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        llama.lm_head.weight.mul_(1.2)

    def model(x, attention_mask=None):
        # A trained model never predicts the mask token.
        logits = llama(x).logits.clone()
        logits[..., MASK] = -1e4
        return SimpleNamespace(logits=logits)

    halted = []
    for trial in range(6):
        prompt = torch.randint(0, MASK, (1, 4), generator=torch.Generator().manual_seed(trial))
        want, nfe = reference_prophet(model, prompt, steps, 12, block_length, MASK, 4 + answer_start)
        out = generate(model, prompt, gen_length=12, steps=steps, block_length=block_length, mask_id=MASK,
                       halting=Prophet(answer_start=answer_start))
        assert torch.equal(out.sequences, want) and out.nfe.tolist() == [nfe]
        halted.append(nfe < steps)
    return halted


def test_prophet_matches_its_reference():
    runs = [h for steps, block in [(12, 12), (12, 4), (6, 4)] for start in (0, 3, 6)
            for h in _prophet_against_reference(steps, block, start)]
    # The equivalence only means something if the reference halts part-way in some runs and not in others.
    assert any(runs) and not all(runs)


def test_parallel_commits_finish_blocks_early(tiny_model):
    prompt = torch.randint(0, MASK, (2, 4), generator=torch.Generator().manual_seed(5))
    full = generate(tiny_model, prompt, gen_length=8, steps=8, block_length=4, mask_id=MASK)
    fast = generate(tiny_model, prompt, gen_length=8, steps=8, block_length=4, mask_id=MASK,
                    parallel_threshold=1e-6)  # everything qualifies: each block in one step
    assert fast.nfe.tolist() == [2, 2]
    assert full.nfe.tolist() == [8, 8]
    strict = generate(tiny_model, prompt, gen_length=8, steps=8, block_length=4, mask_id=MASK,
                      parallel_threshold=1.0)  # nothing qualifies: the schedule alone
    assert torch.equal(strict.sequences, full.sequences)


def test_sampling_is_deterministic_per_generator(tiny_model):
    prompt = torch.randint(0, MASK, (2, 4), generator=torch.Generator().manual_seed(6))
    kw = dict(gen_length=8, steps=4, mask_id=MASK, temperature=1.0)
    a = generate(tiny_model, prompt, generator=torch.Generator().manual_seed(0), **kw)
    b = generate(tiny_model, prompt, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a.sequences, b.sequences)
    c = generate(tiny_model, prompt, generator=torch.Generator().manual_seed(0), remasking="random", **kw)
    assert (c.generated != MASK).all()


def test_cfg_and_suppressed_tokens(tiny_model):
    prompt = torch.randint(0, MASK, (2, 4), generator=torch.Generator().manual_seed(7))
    plain = generate(tiny_model, prompt, gen_length=8, steps=8, mask_id=MASK)
    banned = plain.generated.flatten().unique().tolist()[:3]
    out = generate(tiny_model, prompt, gen_length=8, steps=8, mask_id=MASK, suppress_token_ids=banned, cfg_scale=1.0)
    assert not torch.isin(out.generated, torch.tensor(banned)).any()


def test_left_padding_is_invisible(tiny_model):
    g = torch.Generator().manual_seed(8)
    prompts = torch.randint(0, MASK, (2, 6), generator=g)
    mask = torch.ones_like(prompts)
    mask[0, :2] = 0  # row 0 is a 4-token prompt left-padded to 6
    out = generate(tiny_model, prompts, attention_mask=mask, gen_length=8, steps=8, mask_id=MASK)
    other_pad = prompts.clone()
    other_pad[0, :2] = (prompts[0, :2] + 7) % MASK
    again = generate(tiny_model, other_pad, attention_mask=mask, gen_length=8, steps=8, mask_id=MASK)
    assert torch.equal(out.generated, again.generated)
    alone = generate(tiny_model, prompts[1:], attention_mask=mask[1:], gen_length=8, steps=8, mask_id=MASK)
    assert torch.equal(alone.sequences[0], out.sequences[1])


def test_nan_logits_name_step_and_sample():
    class NaNAtStep2:
        def __init__(self):
            self.n = 0

        def __call__(self, x, attention_mask=None):
            logits = torch.randn(x.shape[0], x.shape[1], VOCAB)
            if self.n == 2:
                logits[1, -1, 4] = float("nan")
            self.n += 1
            return logits

    with pytest.raises(FloatingPointError, match=r"step 2 .*sample\(s\) \[1\]"):
        generate(NaNAtStep2(), torch.zeros(2, 3, dtype=torch.long), gen_length=4, steps=4, mask_id=MASK)


@pytest.mark.parametrize("kwargs,match", [
    (dict(gen_length=0), "gen_length"),
    (dict(steps=0), "steps"),
    (dict(steps=-2), "steps"),
    (dict(mask_id=None), "mask_id is required"),
    (dict(mask_id=VOCAB), "mask_id"),
    (dict(block_length=3), r"block_length must divide gen_length=8.*\[1, 2, 4, 8\]"),
    (dict(block_length=2, steps=6), r"steps=6 must be a multiple of the number of blocks \(4"),
    (dict(remasking="top"), "remasking"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(cfg_scale=float("nan")), "cfg_scale must be a finite number"),
    (dict(cfg_scale=float("inf")), "cfg_scale must be a finite number"),
    (dict(halting="sched"), r"halting must be a HaltingRule .*DecodeSpec"),
])
def test_errors_name_the_argument(tiny_model, kwargs, match):
    args = dict(gen_length=8, steps=8, mask_id=MASK)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(tiny_model, torch.zeros(1, 3, dtype=torch.long), **args)


def test_input_errors(tiny_model):
    with pytest.raises(ValueError, match="2-D int64"):
        generate(tiny_model, torch.zeros(3, dtype=torch.long), gen_length=4, steps=4, mask_id=MASK)
    with pytest.raises(ValueError, match="2-D int64"):
        generate(tiny_model, torch.zeros(1, 3), gen_length=4, steps=4, mask_id=MASK)
    with pytest.raises(ValueError, match=r"already contain mask tokens .* rows \[1\]"):
        generate(tiny_model, torch.tensor([[1, 2], [3, MASK]]), gen_length=4, steps=4, mask_id=MASK)
    for bad in (VOCAB, -1):
        with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, %d\) in rows \[1\]" % VOCAB):
            generate(tiny_model, torch.tensor([[1, 2], [3, bad]]), gen_length=4, steps=4, mask_id=MASK)
    with pytest.raises(ValueError, match="high=1.0 < low=2.0"):
        SchED(ThresholdSchedule("cosine", 1.0, 2.0))
    with pytest.raises(ValueError, match="stat"):
        SchED(stat="max")


# --- Dream-style loop ---------------------------------------------------------------------------------------


class ShiftProbe:
    """Predicts, at position i, the token (i + 1) % 30: right only if the loop shifts the logits by one."""

    def __call__(self, x, attention_mask=None, position_ids=None):
        n = x.shape[1]
        logits = torch.full((x.shape[0], n, VOCAB), -10.0)
        for i in range(n):
            logits[:, i, (i + 1) % 30] = 10.0
        return logits


@pytest.mark.parametrize("alg", ["origin", "maskgit_plus", "topk_margin", "entropy"])
def test_dream_shift(alg):
    prompt = torch.tensor([[1, 2, 3]])
    out = dream_generate(ShiftProbe(), prompt, gen_length=6, steps=3, mask_id=MASK, alg=alg,
                         generator=torch.Generator().manual_seed(0))
    # Position p (absolute) is predicted by logits at p - 1, which say (p - 1 + 1) % 30 = p.
    assert out.generated[0].tolist() == [3, 4, 5, 6, 7, 8]
    assert out.nfe.tolist() == [3]


def test_dream_commit_counts_follow_timesteps():
    out = dream_generate(ShiftProbe(), torch.tensor([[1, 2]]), gen_length=10, steps=4, mask_id=MASK,
                         alg="maskgit_plus", return_trace=True)
    t = torch.linspace(1, 1e-3, 5)
    expected, left = [], 10
    for i in range(4):
        k = left if i == 3 else int(left * float(1 - t[i + 1] / t[i]))
        expected.append(k)
        left -= k
    assert [s.committed for s in out.trace[0]] == expected


def test_dream_halting_and_padding(tiny_model):
    g = torch.Generator().manual_seed(9)
    prompts = torch.randint(0, MASK, (2, 5), generator=g)
    mask = torch.ones_like(prompts)
    mask[0, :2] = 0
    full = dream_generate(tiny_model, prompts, attention_mask=mask, gen_length=8, steps=8, mask_id=MASK,
                          alg="entropy")
    assert (full.generated != MASK).all()
    halted = dream_generate(tiny_model, prompts, attention_mask=mask, gen_length=8, steps=8, mask_id=MASK,
                            alg="entropy", halting=SchED(ThresholdSchedule("constant", 0.0, 0.0)))
    assert halted.nfe.tolist() == [1, 1]
    assert (halted.generated != MASK).all()
