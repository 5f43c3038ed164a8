"""The compacting DiffusionGemma loop (dllm/gemma_loop.py) against transformers' own ``generate``, on a tiny random
model (text width 64, two layers, a one-layer 16-wide vision tower) with its stock sampling: temperature schedule,
entropy-bound acceptance, random renoising."""

import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaAdaptiveStopping,
    StableAndConfidentStoppingCriteria,
)

from diffexit.common.schedules import ThresholdSchedule
from diffexit.dllm.charlm.gemma import chat_tokenizer
from diffexit.dllm.diffusion_gemma import (CanvasSeeds, SchEDStopping, decoder_forward_passes, disable_sched,
                                           enable_sched)
from diffexit.dllm.gemma_loop import decode

CANVAS, STEPS, CANVASES = 16, 8, 3
SEEDS = [3, 4, 5]


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def model(tok, sharp_gemma):
    return sharp_gemma(tok, CANVAS)


@pytest.fixture(scope="module")
def prompts(tok):
    enc = tok(["rev:abcdef", "rev:gh", "rev:mnopqrst"], add_special_tokens=False, padding=True, return_tensors="pt")
    assert not enc["attention_mask"].all()  # left padding exercised
    return enc["input_ids"], enc["attention_mask"]


SETTINGS = dict(max_new_tokens=CANVASES * CANVAS, max_denoising_steps=STEPS)


def _generate(model, ids, mask, rule=None, **kwargs):
    """transformers' generate, with ``rule`` as its diffusion stopping rule (the hook enable_sched uses)."""
    if isinstance(rule, SchEDStopping):
        rule.begin(STEPS)
    if rule is not None:
        model._prepare_diffusion_stopping_criteria = lambda config: rule
    try:
        return model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **SETTINGS, **kwargs)
    finally:
        vars(model).pop("_prepare_diffusion_stopping_criteria", None)


RULES = {
    "stock": lambda: StableAndConfidentStoppingCriteria(1, 0.5),
    "sched": lambda: SchEDStopping(ThresholdSchedule("linear", 3.0, 0.5), stat="min"),
    "sched-stable": lambda: SchEDStopping(ThresholdSchedule("linear", 3.0, 0.5), stat="min", patience=1),
}


def test_with_no_rule_the_loop_is_generate_token_for_token(model, tok, prompts):
    ids, mask = prompts
    torch.manual_seed(5)
    expected = _generate(model, ids, mask, confidence_threshold=None)
    torch.manual_seed(5)
    got = decode(model, ids, attention_mask=mask, confidence_threshold=None, **SETTINGS)
    assert got.sequences.shape == (3, ids.shape[1] + CANVASES * CANVAS)
    assert torch.equal(got.sequences, expected.sequences)
    assert got.passes.tolist() == decoder_forward_passes(expected, ids.shape[1], tok.pad_token_id).tolist() \
        == [CANVASES * STEPS] * 3


def test_a_rule_enabled_on_the_model_is_the_one_the_loop_uses(model, prompts):
    ids, mask = prompts
    expected = decode(model, ids, attention_mask=mask, stopping=RULES["sched"](), seeds=SEEDS, **SETTINGS)
    enable_sched(model, RULES["sched"]())
    try:
        got = decode(model, ids, attention_mask=mask, seeds=SEEDS, **SETTINGS)
    finally:
        disable_sched(model)
    assert torch.equal(got.sequences, expected.sequences) and torch.equal(got.passes, expected.passes)
    assert expected.passes.max() < CANVASES * STEPS


def test_a_rule_that_never_fires_is_generate_too(model, prompts):
    ids, mask = prompts
    torch.manual_seed(6)
    expected = _generate(model, ids, mask, SchEDStopping(ThresholdSchedule("constant", 1e9, 1e9)))
    torch.manual_seed(6)
    got = decode(model, ids, attention_mask=mask, stopping=SchEDStopping(ThresholdSchedule("constant", 1e9, 1e9)),
                 **SETTINGS)
    assert torch.equal(got.sequences, expected.sequences)


@pytest.mark.parametrize("name", sorted(RULES))
def test_with_a_rule_a_batch_decodes_as_each_sample_alone_and_as_generate_alone(model, tok, prompts, name):
    ids, mask = prompts
    batch = decode(model, ids, attention_mask=mask, stopping=RULES[name](), seeds=SEEDS, **SETTINGS)
    assert len(set(batch.passes.tolist())) > 1 and batch.passes.max() < CANVASES * STEPS  # stops exercised
    for i, seed in enumerate(SEEDS):
        alone = decode(model, ids[i:i + 1], attention_mask=mask[i:i + 1], stopping=RULES[name](), seeds=[seed],
                       **SETTINGS)
        assert torch.equal(alone.sequences[0], batch.sequences[i]) and alone.passes.item() == batch.passes[i]
        # A batch of one with the canvases seeded as CanvasSeeds seeds the global generator: generate's own draws.
        reference = _generate(model, ids[i:i + 1], mask[i:i + 1], RULES[name](), streamer=CanvasSeeds(seed))
        assert torch.equal(reference.sequences[0], batch.sequences[i])
        assert decoder_forward_passes(reference, ids.shape[1], tok.pad_token_id).item() == batch.passes[i]


def test_sched_stop_steps_are_kept_per_sample_as_the_batch_shrinks(model, prompts):
    ids, mask = prompts
    rule = RULES["sched"]()
    batch = decode(model, ids, attention_mask=mask, stopping=rule, seeds=SEEDS, **SETTINGS)
    alone = []
    for i, seed in enumerate(SEEDS):
        one = RULES["sched"]()
        decode(model, ids[i:i + 1], attention_mask=mask[i:i + 1], stopping=one, seeds=[seed], **SETTINGS)
        alone.append([int(c[0]) for c in one.canvas_stops])
    assert [[int(c[i]) for c in rule.canvas_stops] for i in range(3)] == alone
    # A sample's passes are its canvases' stop steps + 1 (all steps where it never stopped).
    assert batch.passes.tolist() == [sum(STEPS if s < 0 else s + 1 for s in stops) for stops in alone]


def test_a_stopped_sample_leaves_the_decoder_batch(model, prompts):
    # The decoder's rows over the whole decode are the passes the samples took: nothing runs for a stopped one.
    ids, mask = prompts
    rows = []
    hook = model.model.decoder.register_forward_hook(
        lambda module, args, kwargs, out: rows.append(kwargs["decoder_input_ids"].shape[0]), with_kwargs=True)
    try:
        out = decode(model, ids, attention_mask=mask, stopping=RULES["stock"](), seeds=SEEDS, **SETTINGS)
    finally:
        hook.remove()
    assert sum(rows) == out.passes.sum() < len(rows) * 3


def test_a_sample_that_wrote_eos_leaves_and_is_padded_as_generate_pads_it(model, tok, prompts):
    ids, mask = prompts
    full = decode(model, ids, attention_mask=mask, confidence_threshold=None, seeds=SEEDS, **SETTINGS)
    eos = int(torch.mode(full.sequences[:, ids.shape[1]:].flatten()).values)  # a token the model writes often
    kwargs = dict(eos_token_id=eos, pad_token_id=tok.pad_token_id)
    batch = decode(model, ids, attention_mask=mask, stopping=RULES["stock"](), seeds=SEEDS, **SETTINGS, **kwargs)
    lengths = []
    for i, seed in enumerate(SEEDS):
        reference = _generate(model, ids[i:i + 1], mask[i:i + 1], RULES["stock"](), streamer=CanvasSeeds(seed),
                              **kwargs)
        n = reference.sequences.shape[1]
        lengths.append(n)
        assert torch.equal(reference.sequences[0], batch.sequences[i, :n])
        assert (batch.sequences[i, n:] == tok.pad_token_id).all()
        assert decoder_forward_passes(reference, ids.shape[1], tok.pad_token_id).item() == batch.passes[i]
    assert min(lengths) < batch.sequences.shape[1]  # a sample ended before the last canvas


class Tap:
    """Records what a streamer is given."""

    def __init__(self, takes_logits):
        self._takes_logits, self.calls = takes_logits, []

    def put(self, value):
        self.calls.append(("put", value.clone()))

    def put_draft(self, value=None, logits=None):
        self.calls.append(("draft", (value if logits is None else logits).clone()))

    def end(self):
        self.calls.append(("end", None))


@pytest.mark.parametrize("takes_logits", [False, True])
def test_a_streamer_sees_what_generate_shows_it(model, prompts, takes_logits):
    ids, mask = prompts
    taps = Tap(takes_logits), Tap(takes_logits)
    _generate(model, ids[:1], mask[:1], RULES["stock"](), streamer=CanvasSeeds(3, taps[0]))
    decode(model, ids[:1], attention_mask=mask[:1], stopping=RULES["stock"](), seeds=[3],
           streamer=taps[1], **SETTINGS)
    assert [k for k, _ in taps[0].calls] == [k for k, _ in taps[1].calls]
    assert all(a is b or torch.allclose(a.float(), b.float()) for (_, a), (_, b) in zip(taps[0].calls, taps[1].calls))


class Stateless(DiffusionGemmaAdaptiveStopping):
    def __call__(self, argmax_canvas, logits, **kwargs):
        return torch.zeros(logits.shape[0], dtype=torch.bool)


def test_bad_input_names_the_fix(model, prompts):
    ids, mask = prompts
    with pytest.raises(ValueError, match="no select_rows.*model.generate"):
        decode(model, ids, attention_mask=mask, stopping=Stateless(), **SETTINGS)
    with pytest.raises(ValueError, match="DiffusionGemmaAdaptiveStopping"):
        decode(model, ids, attention_mask=mask, stopping="cosine", **SETTINGS)
    with pytest.raises(ValueError, match="one seed per sample"):
        decode(model, ids, attention_mask=mask, seeds=[1], **SETTINGS)
    with pytest.raises(ValueError, match="confidence_threshold set the stock stopping rule"):
        decode(model, ids, attention_mask=mask, stopping=RULES["stock"](), confidence_threshold=0.1, **SETTINGS)
    enable_sched(model, RULES["sched"]())
    try:
        with pytest.raises(ValueError, match="confidence_threshold set the stock stopping rule.*disable_sched"):
            decode(model, ids, attention_mask=mask, confidence_threshold=0.1, **SETTINGS)
    finally:
        disable_sched(model)
    with pytest.raises(ValueError, match="cache_implementation='static'.*model.generate"):
        decode(model, ids, attention_mask=mask, cache_implementation="static", **SETTINGS)
    with pytest.raises(ValueError, match="not decoder_input_ids"):
        decode(model, ids, attention_mask=mask, decoder_input_ids=ids[:, :CANVAS], **SETTINGS)
    with pytest.raises(ValueError, match="pass pad_token_id="):
        decode(model, ids, attention_mask=mask, eos_token_id=5, pad_token_id=None, **SETTINGS)
