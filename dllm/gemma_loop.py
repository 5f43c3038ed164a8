"""DiffusionGemma decoding in which a sample that stopped leaves the batch.

transformers' ``DiffusionGemmaForBlockDiffusion.generate`` keeps a sample whose stopping rule fired in the batch,
frozen, until every sample of the canvas has stopped, and keeps a sample that wrote EOS in the batch until every
sample has; its wall-clock follows the slowest sample. :func:`decode` runs the same encoder and decoder calls, the
same temperature schedule, ``EntropyBoundSampler`` acceptance and renoising, and the same stopping rule, but runs
each decoder pass on the samples still denoising only (their rows of the encoder's KV cache, their rows of the
rule's state), and encodes the next canvas for the samples that have not ended only::

    from diffexit.dllm.gemma_loop import decode
    out = decode(model, input_ids, attention_mask=mask, max_new_tokens=64, stopping=rule, seeds=[0, 1, 2])
    out.sequences, out.passes          # as generate's sequences; decoder passes per sample

Noise. ``generate`` draws each step's noise for the whole batch from torch's global generator. With
``seeds=None`` so does :func:`decode`, over the samples in the batch at that step: with no sample leaving early
(no rule, or one that never fires, and no EOS before the last canvas) every draw is ``generate``'s and the output
is ``generate``'s token for token. With ``seeds`` (one int per sample) each sample draws from its own generator,
seeded before canvas ``c`` with :func:`~diffexit.dllm.diffusion_gemma.canvas_seed` ``(seed, c)``, so a sample's
tokens depend on nothing else in its batch: a batch decodes as each sample decoded alone, with or without a rule,
and as ``generate`` on that sample alone with ``streamer=CanvasSeeds(seed)``.

A stopping rule is ``generate``'s: ``stopping=`` or, without it, the one ``generate`` would build (the stock
``StableAndConfidentStoppingCriteria`` from the generation config's thresholds, or the rule ``enable_sched`` put
on the model). A rule keeps per-sample state, which the loop compacts with it: the stock rule's history directly,
any other rule through its ``select_rows(index)`` method (``SchEDStopping`` has one).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaAdaptiveStopping,
    StableAndConfidentStoppingCriteria,
)

from .diffusion_gemma import canvas_seed


@dataclass
class GemmaLoopOutput:
    """``sequences`` ``[B, P + canvases * canvas_length]``: the prompt and the canvases, pad after a sample's first
    EOS, as ``generate`` returns them; ``passes`` ``[B]`` int64: the decoder passes each sample took part in."""

    sequences: torch.LongTensor
    passes: torch.LongTensor


class SharedNoise:
    """``generate``'s draws: torch's global generator, one draw for all the rows in the batch at that step."""

    def start_canvas(self, canvas: int) -> None:
        """Nothing to reseed: the global generator runs on (a streamer such as ``CanvasSeeds`` may reseed it)."""

    def tokens(self, rows: list[int], length: int, vocab: int, device) -> torch.LongTensor:
        """Uniform random tokens ``[len(rows), length]``."""
        return torch.randint(0, vocab, (len(rows), length), device=device)

    def sample(self, probs: torch.Tensor, rows: list[int]) -> torch.LongTensor:
        """One token per position of ``probs`` ``[b, length, V]``: ``[b, length]``."""
        b, length, vocab = probs.shape
        return torch.multinomial(probs.view(-1, vocab), num_samples=1).view(b, length)


class SampleNoise:
    """Each sample's own generator, reseeded before every canvas from its seed and the canvas index: the draws a
    sample decoded alone by ``generate`` (batch of one, ``CanvasSeeds(seed)``) takes from the global generator."""

    def __init__(self, seeds: Sequence[int], device):
        self.seeds, self.device = [int(s) for s in seeds], device
        self.generators: list[torch.Generator] = []

    def start_canvas(self, canvas: int) -> None:
        self.generators = [torch.Generator(self.device).manual_seed(canvas_seed(s, canvas)) for s in self.seeds]

    def tokens(self, rows: list[int], length: int, vocab: int, device) -> torch.LongTensor:
        return torch.cat([torch.randint(0, vocab, (1, length), device=device, generator=self.generators[r])
                          for r in rows])

    def sample(self, probs: torch.Tensor, rows: list[int]) -> torch.LongTensor:
        return torch.stack([torch.multinomial(p, num_samples=1, generator=self.generators[r]).squeeze(-1)
                            for p, r in zip(probs, rows)])


def check_compactable(rule: Optional[DiffusionGemmaAdaptiveStopping]) -> None:
    """Refuse a rule whose per-sample state the loop cannot keep in step with the shrinking batch."""
    if rule is None or type(rule) is StableAndConfidentStoppingCriteria or callable(getattr(rule, "select_rows", None)):
        return
    if not isinstance(rule, DiffusionGemmaAdaptiveStopping):
        raise ValueError(f"stopping must be a DiffusionGemmaAdaptiveStopping (e.g. diffexit's SchEDStopping), got "
                         f"{type(rule).__name__}")
    raise ValueError(f"{type(rule).__name__} has no select_rows(index) method, so its per-sample state cannot follow "
                     f"the batch as stopped samples leave it: add one (see SchEDStopping.select_rows), or decode with "
                     f"model.generate")


def select_rule_rows(rule: DiffusionGemmaAdaptiveStopping, index: torch.LongTensor) -> None:
    """Keep the rule's state of the batch rows ``index`` only, in that order."""
    if type(rule) is StableAndConfidentStoppingCriteria:
        if rule.argmax_canvas_history is not None:  # [stability_threshold, B, canvas]
            rule.argmax_canvas_history = rule.argmax_canvas_history[:, index]
    else:
        rule.select_rows(index)


def cache_rows(cache, index: torch.LongTensor):
    """A view of ``cache`` with the batch rows ``index`` only; ``cache`` itself is left as it is (its stopped rows
    are encoded with the next canvas). Each layer is copied shallowly and re-pointed at the selected rows."""
    view = copy.copy(cache)
    view.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in view.layers:
        layer.batch_select_indices(index)
    return view


class ModelSampling:
    """``generate``'s denoising step: the logits processors (its temperature schedule), a token drawn from their
    softmax, ``EntropyBoundSampler`` acceptance, and the rejected positions renoised. ``step`` returns the next
    canvas and the processed logits, which the rule reads and the next step self-conditions on."""

    def __init__(self, model, generation_config, noise):
        self.sampler = model._prepare_sampler(generation_config)
        self.processors = model._prepare_logits_processor(generation_config)
        self.steps, self.noise = generation_config.max_denoising_steps, noise
        self.vocab, self.length = model.config.text_config.vocab_size, model.config.canvas_length
        self.dtype = model.model.decoder.embed_tokens.weight.dtype

    def start_canvas(self, canvas: int, rows: list[int], device) -> torch.LongTensor:
        self.noise.start_canvas(canvas)
        return self.noise.tokens(rows, self.length, self.vocab, device)

    def step(self, logits: torch.Tensor, canvas: torch.LongTensor, step: int, rows: list[int], denoise=None):
        # generate counts its steps down from T to 1 and passes the count as an int32 tensor; the temperature is
        # computed from it the same way here, so the scaled logits match to the bit.
        remaining = torch.tensor(self.steps - step, device=canvas.device, dtype=torch.int32)
        processed = self.processors(None, logits, cur_step=remaining)
        drawn = self.noise.sample(torch.softmax(processed, dim=-1, dtype=torch.float32), rows)
        accepted = self.sampler.accept_canvas(canvas, drawn, processed, remaining)
        noise = self.noise.tokens(rows, self.length, self.vocab, canvas.device)
        return torch.where(self.sampler.accepted_token_mask, accepted, noise), processed.to(self.dtype)

    def final(self, canvas: torch.LongTensor, argmax: torch.LongTensor) -> torch.LongTensor:
        """A canvas that ran every step ends as its last argmax, as ``generate`` appends it."""
        return argmax


@torch.no_grad()
def run_canvases(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor, *, canvases: int, steps: int,
                 sampling, rule: Optional[DiffusionGemmaAdaptiveStopping], finalize, fill_id: int, streamer=None,
                 prefill_kwargs: Optional[dict] = None) -> GemmaLoopOutput:
    """The canvas loop; :func:`decode` (``generate``'s sampling) and the diffusers pipeline (a scheduler's) call it.

    Args:
        input_ids, attention_mask: ``[B, P]``, the prompt (left padding masked out).
        canvases, steps: canvases at most, denoising steps per canvas at most.
        sampling: ``start_canvas(canvas, rows, device) -> [b, L]`` and ``step(logits, canvas, step, rows, denoise)
            -> (next canvas [b, L], logits [b, L, V] the rule reads and the next step self-conditions on)``; ``rows``
            are the original batch indices of the ``b`` samples in the call, ``denoise(canvas, conditioning) ->
            logits`` one more decoder pass on them (a corrector sweep); and ``final(canvas, argmax) -> [b, L]``, what
            a canvas that ran every step ends as.
        rule: called ``rule(argmax [b, L], logits [b, L, V]) -> [b]`` after each step; ``reset()`` before each
            canvas; its state compacted by :func:`select_rule_rows`.
        finalize: ``finalize(sequences [B, n], finished [B]) -> (sequences, finished)`` after each canvas (which
            samples have ended, and their tokens after it); a sample that ended leaves the batch.
        fill_id: the token of the canvases of a sample that has ended (``finalize`` may rewrite them).
        streamer: ``put`` (the prompt, then each finished canvas ``[B, L]``), ``put_draft`` (each step's argmax
            ``[B, L]``, or its logits ``[B, L, V]`` if ``streamer._takes_logits``; rows out of the batch hold
            ``fill_id`` / zeros), ``end``, as ``generate`` calls them.
        prefill_kwargs: extra inputs of the first encoder call (e.g. an image's).
    """
    device, batch = input_ids.device, input_ids.shape[0]
    length = model.config.canvas_length
    text_config = model.config.get_text_config(decoder=True)
    cache = DynamicCache(config=text_config)
    sequences, mask = input_ids, attention_mask.bool()
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    passes = torch.zeros(batch, dtype=torch.long, device=device)
    live = torch.arange(batch, device=device)  # samples that have not ended, in cache row order
    takes_logits = getattr(streamer, "_takes_logits", False)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    for c in range(canvases):
        cur = sequences.shape[1]
        new = sequences[live] if c == 0 else sequences[live, -length:]
        start = cur - new.shape[1]
        positions = torch.arange(start, cur, dtype=torch.int32, device=device).unsqueeze(0)
        encoder_masks = model.model.encoder.create_masks_for_generate(
            config=model.config, inputs_embeds=torch.empty((len(live), new.shape[1], 0), dtype=model.dtype,
                                                           device=device),
            attention_mask=mask[live], cache=cache, position_ids=positions, mm_token_type_ids=None)
        extra = (prefill_kwargs or {}) if c == 0 else {}
        model.model.encoder(input_ids=new.contiguous(), attention_mask=encoder_masks, cache=cache,
                            position_ids=positions, **extra)
        decoder_positions = torch.arange(cur, cur + length, dtype=torch.int32, device=device).unsqueeze(0)
        decoder_mask = F.pad(mask[live], (0, length), value=True)

        rows = live.tolist()
        canvas = sampling.start_canvas(c, rows, device)
        argmax = torch.full((batch, length), fill_id, dtype=torch.long, device=device)
        argmax[live] = canvas
        drafts = torch.zeros((batch, length, text_config.vocab_size), device=device) if takes_logits else None
        active = torch.arange(len(live), device=device)  # positions in `live` (and cache rows) still denoising
        view, conditioning = cache, None
        masks = model.model.decoder.create_diffusion_decoder_attention_mask(
            config=model.config, inputs_embeds=canvas.unsqueeze(-1), cache=view, decoder_attention_mask=decoder_mask)
        if rule is not None:
            rule.reset()

        def denoise(canvas, conditioning):
            passes[live[active]] += 1
            return model(decoder_input_ids=canvas, cache=view, self_conditioning_logits=conditioning,
                         decoder_attention_mask=masks, decoder_position_ids=decoder_positions).logits

        for step in range(steps):
            canvas, conditioning = sampling.step(denoise(canvas, conditioning), canvas, step, rows, denoise)
            step_argmax = conditioning.argmax(-1)
            argmax[live[active]] = step_argmax
            if streamer is not None and hasattr(streamer, "put_draft"):
                if takes_logits:
                    drafts[live[active]] = conditioning.float()
                    streamer.put_draft(logits=drafts.cpu())
                else:
                    streamer.put_draft(value=argmax.cpu())
            if rule is None:
                continue
            stop = rule(step_argmax, conditioning)
            if bool(stop.all()):
                active = active[:0]
                break
            if bool(stop.any()):
                keep = (~stop).nonzero().squeeze(-1)
                active, canvas, conditioning = active[keep], canvas[keep], conditioning[keep]
                rows = [rows[i] for i in keep.tolist()]
                select_rule_rows(rule, keep)
                view = cache_rows(cache, active)
                masks = model.model.decoder.create_diffusion_decoder_attention_mask(
                    config=model.config, inputs_embeds=canvas.unsqueeze(-1), cache=view,
                    decoder_attention_mask=decoder_mask[active])

        if len(active):
            argmax[live[active]] = sampling.final(canvas, argmax[live[active]])
        sequences, finished = finalize(torch.cat([sequences, argmax], -1), finished)
        mask = F.pad(mask, (0, length), value=True)
        if streamer is not None:
            streamer.put(sequences[:, -length:].cpu())
        if bool(finished.all()):
            break
        if bool(finished[live].any()):
            keep = (~finished[live]).nonzero().squeeze(-1)
            live = live[keep]
            cache.batch_select_indices(keep)
    if streamer is not None:
        streamer.end()
    return GemmaLoopOutput(sequences=sequences, passes=passes)


def decode(model, input_ids: torch.LongTensor, *, attention_mask: Optional[torch.Tensor] = None,
           stopping: Optional[DiffusionGemmaAdaptiveStopping] = None, seeds: Optional[Sequence[int]] = None,
           streamer=None, **config) -> GemmaLoopOutput:
    """Decode like ``model.generate(input_ids, attention_mask=..., streamer=..., **config)``, with stopped samples
    out of the batch; see the module docstring.

    Args:
        input_ids, attention_mask: ``[B, P]``.
        stopping: the stopping rule; None: the one ``generate`` builds from ``config`` (pass
            ``confidence_threshold=None`` to run every step). A rule's ``bind(model)`` (``LearnedStopping``'s) is called,
            then its ``begin(steps)`` (``SchEDStopping``'s).
        seeds: one per sample, for per-sample noise; None: the global generator, as ``generate``.
        config: ``generate``'s generation settings (``max_new_tokens``, ``max_denoising_steps``, ``t_min``,
            ``t_max``, ``sampler_config``, the stock thresholds, ``eos_token_id``, ``pad_token_id``).
    """
    generation_config, extra = model._prepare_generation_config(None, **config)
    if extra:
        raise ValueError(f"decode takes generate's generation settings, not {', '.join(sorted(extra))}; decode with "
                         f"model.generate for model inputs such as images or a starting canvas")
    if generation_config.cache_implementation not in (None, "dynamic"):
        raise ValueError(f"cache_implementation={generation_config.cache_implementation!r}: the loop drops rows of a "
                         f"DynamicCache as samples stop; leave it unset, or decode with model.generate")
    given = [k for k in ("stability_threshold", "confidence_threshold") if config.get(k) is not None]
    if given and stopping is not None:
        raise ValueError(f"{', '.join(given)} set the stock stopping rule, and stopping= replaces it; pass one or "
                         f"the other")
    if given and getattr(model, "_diffexit_stopping", None) is not None:
        raise ValueError(f"{', '.join(given)} set the stock stopping rule, which enable_sched replaced on this model; "
                         f"drop them, or call disable_sched(model) to use the stock rule")
    rule = stopping if stopping is not None else model._prepare_diffusion_stopping_criteria(generation_config)
    check_compactable(rule)
    steps = generation_config.max_denoising_steps
    if stopping is not None and callable(getattr(stopping, "bind", None)):
        stopping.bind(model)  # a learned rule (diffexit.dllm.gemma_commit) loads and checks its commit model
    if stopping is not None and callable(getattr(stopping, "begin", None)):
        stopping.begin(steps)
    batch, prompt_length = input_ids.shape
    if seeds is not None and len(seeds) != batch:
        raise ValueError(f"seeds has {len(seeds)} entries for a batch of {batch}: give one seed per sample")
    pad, eos = generation_config.pad_token_id, generation_config.eos_token_id
    if pad is None and eos is not None:
        raise ValueError(f"the generation config has an eos_token_id but no pad_token_id, which fills a sample's "
                         f"canvases after its EOS once it leaves the batch: pass pad_token_id= (the text config's "
                         f"is {model.config.get_text_config().pad_token_id})")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must be 2D like input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape)}")
    _, max_new_tokens = model._prepare_generated_length(generation_config, prompt_length)
    length = model.config.canvas_length
    criteria = model._prepare_ar_stopping_criteria(generation_config)
    eos_tensor = None if eos is None else torch.tensor(eos, device=input_ids.device)

    def finalize(sequences, finished):
        return model._finalize_canvas(sequences, finished, generation_config, criteria, length, eos_tensor)

    noise = SharedNoise() if seeds is None else SampleNoise(seeds, input_ids.device)
    return run_canvases(model, input_ids, attention_mask, canvases=-(-max_new_tokens // length), steps=steps,
                        sampling=ModelSampling(model, generation_config, noise), rule=rule, finalize=finalize,
                        fill_id=0 if pad is None else pad, streamer=streamer)
