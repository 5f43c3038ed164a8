"""SchED on DiffusionGemma: the stopping rule inside transformers' ``generate`` and in diffusers' pipeline, against
the stock ``StableAndConfidentStoppingCriteria`` and the stock pipeline, on a tiny random model."""

import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaAdaptiveStopping,
    EntropyBoundSamplerConfig,
    StableAndConfidentStoppingCriteria,
)

from diffexit.common.schedules import ThresholdSchedule
from diffexit.dllm.charlm.gemma import chat_tokenizer, gemma_config
from diffexit.dllm.diffusion_gemma import SchEDStopping, decoder_forward_passes, disable_sched, enable_sched

CANVAS = 16
STEPS = 12
# Near-zero temperature and an entropy bound that accepts every token: sampling is the argmax, and nothing is
# renoised at random, so a sample's path does not depend on the random draws of the others in its batch.
DETERMINISTIC = dict(t_min=1e-4, t_max=2e-4, sampler_config=EntropyBoundSamplerConfig(entropy_bound=1e3))
# Warmer, for the entropy statistic (near zero temperature every entropy underflows to 0): sampled, so the runs
# compared share their batch and seed.
WARM = dict(DETERMINISTIC, t_min=0.01, t_max=0.02)


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.manual_seed(0)
    return DiffusionGemmaForBlockDiffusion(gemma_config(tok, canvas_length=CANVAS)).eval()


def _prompts(tok, n=3):
    ids = tok([f"rev:{w}" for w in ("abcdef", "ghijkl", "mnopqr", "stuvwx")[:n]], add_special_tokens=False,
              return_tensors="pt")["input_ids"]
    canvas = torch.randint(4, 90, (n, CANVAS), generator=torch.Generator().manual_seed(1))
    return ids, canvas


def _generate(model, ids, canvas, sampling=DETERMINISTIC, **kwargs):
    torch.manual_seed(0)
    return model.generate(ids, decoder_input_ids=canvas, max_new_tokens=CANVAS, max_denoising_steps=STEPS,
                          return_dict_in_generate=True, **sampling, **kwargs)


class Recorder(DiffusionGemmaAdaptiveStopping):
    """Never stops; keeps each call's canvas statistic ``[B]`` (the rule's ``statistic`` of the logits it is given)."""

    def __init__(self, rule):
        self.rule, self.values = rule, []

    def __call__(self, argmax_canvas, logits, **kwargs):
        self.values.append(self.rule.statistic(logits))
        return torch.zeros(logits.shape[0], dtype=torch.bool)


def _recorded(model, ids, canvas, stat, sampling=DETERMINISTIC):
    recorder = Recorder(SchEDStopping(ThresholdSchedule("constant", 0.0, 0.0), stat=stat))
    model._prepare_diffusion_stopping_criteria = lambda config: recorder
    try:
        _generate(model, ids, canvas, sampling)
    finally:
        del model._prepare_diffusion_stopping_criteria
    return torch.stack(recorder.values)  # [steps, B]


def test_a_rule_that_never_fires_gives_the_stock_full_step_output(model, tok):
    ids, canvas = _prompts(tok)
    full = _generate(model, ids, canvas, confidence_threshold=None)
    enable_sched(model, SchEDStopping(ThresholdSchedule("constant", 1e9, 1e9)))
    try:
        ours = _generate(model, ids, canvas)
    finally:
        disable_sched(model)
    assert torch.equal(ours.sequences, full.sequences)
    assert decoder_forward_passes(ours, ids.shape[1], tok.pad_token_id).tolist() == [STEPS] * 3


def test_constant_threshold_on_the_stock_statistic_stops_where_the_stock_rule_does(model, tok):
    ids, canvas = _prompts(tok)
    entropy = -_recorded(model, ids, canvas, "mean_entropy", WARM)
    # A confidence threshold the trajectories cross part-way: halfway between the middle two recorded mean
    # entropies, so that no recorded value sits on it (the stock test is `<`, ours `>=` on the negation).
    ordered = entropy.flatten().sort().values
    threshold = float(ordered[len(ordered) // 2 - 1: len(ordered) // 2 + 1].mean())

    stock_stops = {}

    class Stock(StableAndConfidentStoppingCriteria):
        def __call__(self, argmax_canvas, logits, **kwargs):
            stop = super().__call__(argmax_canvas, logits, **kwargs)
            for i in stop.nonzero().flatten().tolist():
                stock_stops.setdefault(i, self.calls)
            self.calls += 1
            return stop

        def reset(self):
            super().reset()
            self.calls = 0

    model._prepare_diffusion_stopping_criteria = lambda config: Stock(1, threshold)
    try:
        stock = _generate(model, ids, canvas, WARM)
    finally:
        del model._prepare_diffusion_stopping_criteria

    rule = SchEDStopping(ThresholdSchedule("constant", -threshold, -threshold), stat="mean_entropy", patience=1)
    enable_sched(model, rule)
    try:
        ours = _generate(model, ids, canvas, WARM)
    finally:
        disable_sched(model)
    expected = [stock_stops.get(i, -1) for i in range(3)]
    assert rule.stop_steps.tolist() == expected
    assert any(0 <= s < STEPS - 1 for s in expected), expected  # the comparison exercises a stop
    assert torch.equal(ours.sequences, stock.sequences)


def test_per_sample_stops_in_a_batch_equal_each_sample_alone(model, tok):
    ids, canvas = _prompts(tok)
    margins = _recorded(model, ids, canvas, "mean")
    schedule = ThresholdSchedule("linear", float(margins.quantile(0.8)), float(margins.quantile(0.2)))
    rule = SchEDStopping(schedule, stat="mean")
    enable_sched(model, rule)
    try:
        batch = _generate(model, ids, canvas)
        batch_stops = rule.stop_steps.clone()
        alone = []
        for i in range(3):
            out = _generate(model, ids[i:i + 1], canvas[i:i + 1])
            alone.append((out.sequences[0], int(rule.stop_steps[0])))
    finally:
        disable_sched(model)
    assert [s for _, s in alone] == batch_stops.tolist()
    assert len(set(batch_stops.tolist())) > 1, batch_stops  # the samples stop at different steps
    for i, (seq, _) in enumerate(alone):
        assert torch.equal(seq, batch.sequences[i])
    # The model's own count of decoder passes (inverted from tokens_per_forward) is the rule's stop step + 1.
    passes = decoder_forward_passes(batch, ids.shape[1], tok.pad_token_id)
    assert passes.tolist() == torch.where(batch_stops < 0, STEPS, batch_stops + 1).tolist()


def test_the_rule_runs_on_generates_compile_path(model, tok, monkeypatch):
    # A static cache sends generate through `_compile_functions`, which assigns a compiled `__call__` on the rule
    # instance; the loop calls `rule(...)`, which Python looks up on the class, so ours runs eagerly all the same.
    # torch.compile is replaced by the identity here (compiling the model takes minutes on a CPU).
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    ids, canvas = _prompts(tok, 1)
    rule = SchEDStopping(ThresholdSchedule("constant", -1e9, -1e9))  # stops at the first step
    enable_sched(model, rule)
    try:
        out = _generate(model, ids, canvas, cache_implementation="static")
    finally:
        disable_sched(model)
        for name in [n for n in vars(model) if n.startswith("_compiled")]:
            delattr(model, name)
    assert rule.stop_steps.tolist() == [0] and out.sequences.shape == (1, ids.shape[1] + CANVAS)


def test_bad_input_names_the_fix(model, tok, tiny_llama):
    with pytest.raises(ValueError, match="takes a DiffusionGemmaForBlockDiffusion.*halting=SchED"):
        enable_sched(tiny_llama, SchEDStopping(ThresholdSchedule("constant", 1.0, 1.0)))
    with pytest.raises(ValueError, match="must be a ThresholdSchedule"):
        SchEDStopping("cosine:7.5:2.5")
    with pytest.raises(ValueError, match="stat must be one of"):
        SchEDStopping(ThresholdSchedule("constant", 1.0, 1.0), stat="max")
    with pytest.raises(ValueError, match="rule must be a SchEDStopping or a LearnedStopping"):
        enable_sched(model, StableAndConfidentStoppingCriteria(1, 0.005))
    with pytest.raises(RuntimeError, match="enable_sched"):
        SchEDStopping(ThresholdSchedule("constant", 1.0, 1.0))(torch.zeros(1, 4, dtype=torch.long),
                                                               torch.zeros(1, 4, 8))
    ids, canvas = _prompts(tok, 1)
    enable_sched(model, SchEDStopping(ThresholdSchedule("constant", 1.0, 1.0)))
    try:
        with pytest.raises(ValueError, match="confidence_threshold set the stock stopping rule.*disable_sched"):
            _generate(model, ids, canvas, confidence_threshold=0.01)
    finally:
        disable_sched(model)
    with pytest.raises(ValueError, match="not enabled"):
        disable_sched(model)
    assert "generate" not in vars(model)  # the stock method again


# --- diffusers' pipeline ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipes(tok, sharp_gemma):
    from diffusers import BlockRefinementScheduler, DiffusionGemmaPipeline

    from diffexit.samplers.diffusion_gemma_pipeline import SchEDDiffusionGemmaPipeline

    model = sharp_gemma(tok, CANVAS)  # sure enough that the stock rule stops samples part-way, at different steps
    stock = DiffusionGemmaPipeline(model=model, scheduler=BlockRefinementScheduler(), processor=tok)
    stock.set_progress_bar_config(disable=True)
    ours = SchEDDiffusionGemmaPipeline.from_pipe(stock)
    ours.set_progress_bar_config(disable=True)
    return stock, ours


PIPE_PROMPTS = ["rev:abcdef", "rev:ghijkl", "rev:mnopqr"]


def _pipe(pipe, **kwargs):
    return pipe(prompt=PIPE_PROMPTS, gen_length=2 * CANVAS, num_inference_steps=STEPS, eos_early_stop=False,
                output_type="seq", generator=torch.Generator().manual_seed(0), **kwargs).sequences


def _stock_pipe(pipe, monkeypatch, **kwargs):
    """The stock pipeline, with the one keyword transformers 5.24 renamed passed under its new name."""
    from transformers.models.diffusion_gemma import modeling_diffusion_gemma as modeling

    decoder = modeling.DiffusionGemmaDecoderModel
    original = decoder.create_diffusion_decoder_attention_mask
    with monkeypatch.context() as m:
        m.setattr(decoder, "create_diffusion_decoder_attention_mask",
                  staticmethod(lambda past_key_values, **kw: original(cache=past_key_values, **kw)))
        return _pipe(pipe, **kwargs)


def test_the_stock_pipeline_fails_on_the_pinned_transformers(pipes):
    # Why SchEDDiffusionGemmaPipeline runs its own loop (its module docstring); if this starts passing, diffusers
    # and transformers agree again and the docstring should say so.
    with pytest.raises(TypeError, match="past_key_values"):
        _pipe(pipes[0])


def test_pipeline_with_the_stock_rule_is_the_stock_pipeline(pipes, monkeypatch):
    stock, ours = pipes
    for threshold in (0.005, 0.5):
        expected = _stock_pipe(stock, monkeypatch, stability_threshold=1, confidence_threshold=threshold)
        got = _pipe(ours, stopping=StableAndConfidentStoppingCriteria(1, threshold))
        assert torch.equal(got, expected), threshold
        assert torch.equal(_pipe(ours, confidence_threshold=threshold), expected)
    assert ours.decoder_passes.max() < 2 * STEPS and len(set(ours.decoder_passes.tolist())) > 1  # stops exercised
    assert torch.equal(_pipe(ours, stopping=SchEDStopping(ThresholdSchedule("constant", 1e9, 1e9))),
                       _stock_pipe(stock, monkeypatch, confidence_threshold=None))
    assert torch.equal(_pipe(ours), _stock_pipe(stock, monkeypatch))  # no arguments: the stock defaults


def test_pipeline_runs_the_decoder_on_the_samples_still_denoising_only(pipes):
    # The output is the stock pipeline's (above); the decoder's rows over the decode are the passes the samples took.
    _, ours = pipes
    rows = []
    hook = ours.model.model.decoder.register_forward_hook(
        lambda module, args, kwargs, out: rows.append(kwargs["decoder_input_ids"].shape[0]), with_kwargs=True)
    try:
        _pipe(ours, stopping=StableAndConfidentStoppingCriteria(1, 0.5))
    finally:
        hook.remove()
    assert sum(rows) == ours.decoder_passes.sum() < len(rows) * len(PIPE_PROMPTS)


def test_pipeline_a_sample_that_wrote_eos_leaves_with_the_stock_text(pipes, monkeypatch):
    from transformers.models.diffusion_gemma import modeling_diffusion_gemma as modeling

    stock, ours = pipes
    eos = int(torch.mode(_stock_pipe(stock, monkeypatch, confidence_threshold=None)[:, :CANVAS].flatten()).values)
    kwargs = dict(prompt=PIPE_PROMPTS, gen_length=3 * CANVAS, num_inference_steps=STEPS, eos_token_id=eos,
                  confidence_threshold=None, output_type="seq")
    original = modeling.DiffusionGemmaDecoderModel.create_diffusion_decoder_attention_mask
    with monkeypatch.context() as m:  # as _stock_pipe, with EOS early stop on
        m.setattr(modeling.DiffusionGemmaDecoderModel, "create_diffusion_decoder_attention_mask",
                  staticmethod(lambda past_key_values, **kw: original(cache=past_key_values, **kw)))
        expected = stock(generator=torch.Generator().manual_seed(0), **kwargs).sequences
    got = ours(generator=torch.Generator().manual_seed(0), **kwargs).sequences
    # The stock pipeline goes on decoding a sample's canvases after the one with its EOS (its text stops at the EOS);
    # ours fills them with EOS.
    assert got.shape == expected.shape
    for row, want in zip(got, expected):
        # the end of the canvas that holds the first EOS
        end = (int((want == eos).nonzero()[0, 0]) // CANVAS + 1) * CANVAS if (want == eos).any() else len(want)
        assert torch.equal(row[:end], want[:end]) and (row[end:] == eos).all()
    assert (ours.decoder_passes < 3 * STEPS).any()  # a sample left early


def test_pipeline_sched_stops_early_and_counts_passes(pipes):
    _, ours = pipes
    rule = SchEDStopping(ThresholdSchedule("constant", -1e9, -1e9))
    _pipe(ours, stopping=rule)
    assert ours.decoder_passes.tolist() == [2] * 3  # one pass per canvas, two canvases
    assert [c.tolist() for c in rule.canvas_stops] == [[0] * 3, [0] * 3]


def test_pipeline_bad_input_names_the_fix(pipes):
    _, ours = pipes
    rule = SchEDStopping(ThresholdSchedule("constant", 1.0, 1.0))
    with pytest.raises(ValueError, match="confidence_threshold set the stock stopping rule"):
        _pipe(ours, stopping=rule, confidence_threshold=0.01)
    with pytest.raises(ValueError, match="stability_threshold set the stock stopping rule"):
        _pipe(ours, stopping=rule, stability_threshold=2)
    with pytest.raises(ValueError, match="DiffusionGemmaAdaptiveStopping"):
        _pipe(ours, stopping="cosine")
