"""The training objective of the embedded DiffusionGemma model, as its sampler implies it.

DiffusionGemma's ``generate`` starts each canvas from uniform random tokens and, step by step, keeps the tokens it
accepts and redraws the rest uniformly (``EntropyBoundSampler``), feeding the previous step's logits back in as
self-conditioning (``self_conditioning_logits``, turned into soft embeddings by the decoder). So the model learns
to map a canvas where each token was replaced by a uniform random one with probability ``t`` back to the clean
canvas (uniform-state discrete diffusion), with the clean tokens of the prompt and of the canvases before it in the
encoder's context:

- per example, ``t ~ U(eps, 1)`` (stratified over the batch); each canvas token is redrawn uniformly from the whole
  vocabulary (as ``initialize_canvas`` draws) with probability ``t``;
- the loss is the cross-entropy against the clean canvas at **every** canvas position, a plain mean: a redrawn
  token can equal the clean one and the model is never told which were redrawn, so every position is a prediction;
- self-conditioning as the modeling code trains it: for a random half of the examples, a first pass without it
  (no gradient) gives logits that the second pass reads through ``self_conditioning_logits``; the other half get
  ``self_conditioning_mask=False`` (a zeroed signal, what the first denoising step sees). At inference the logits
  fed back are the temperature-scaled ones (``t_max`` 0.8 to ``t_min`` 0.4 by default); training feeds raw logits.

Which canvas: short spans are one canvas; ``chain``'s 144-token span is nine, and each step trains one of them (the
same for the step's long batch), with the clean answer before it as context, as ``generate`` encodes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import group_weights, step_examples, step_seed
from .gemma import gemma_span
from .objective import MASK_EPS
from .tasks import LAYOUTS
from .tokenizer import encode_answers, encode_prompts

SELF_CONDITIONING_PROB = 0.5


def gemma_batch(tokenizer, examples, layout, canvas: int, canvas_length: int):
    """``(input_ids, attention_mask, target)``: prompt (left-padded) plus the clean canvases before ``canvas``, and
    canvas ``canvas`` of the answer span (answer, then EOS), int64 ``[B, P + canvas * C]`` and ``[B, C]``."""
    prompt, prompt_mask = encode_prompts(tokenizer, [e.prompt for e in examples], layout.prompt_length)
    span = encode_answers(tokenizer, [e.answer for e in examples], gemma_span(layout, canvas_length))
    before = span[:, : canvas * canvas_length]
    ids = torch.cat([prompt, before], 1)
    mask = torch.cat([prompt_mask, torch.ones_like(before)], 1)
    return ids, mask, span[:, canvas * canvas_length: (canvas + 1) * canvas_length]


def denoiser_logits(model, ids, mask, canvas_ids, self_conditioning_logits=None, self_conditioning_mask=None):
    """The decoder's logits ``[B, C, V]`` for ``canvas_ids`` after the context ``ids``, at the positions ``generate``
    gives them (absolute, left padding included)."""
    length, canvas_length = ids.shape[1], canvas_ids.shape[1]
    device = ids.device
    return model(
        input_ids=ids, attention_mask=mask, position_ids=torch.arange(length, device=device)[None],
        decoder_input_ids=canvas_ids, decoder_attention_mask=F.pad(mask.bool(), (0, canvas_length), value=True),
        decoder_position_ids=torch.arange(length, length + canvas_length, device=device)[None],
        self_conditioning_logits=self_conditioning_logits, self_conditioning_mask=self_conditioning_mask,
    ).logits


def gemma_training_loss(model, tokenizer, step: int, args, rank: int) -> torch.Tensor:
    """The loss of training step ``step`` (a scalar): each layout group's mean, weighted by its tasks' shares."""
    gen = torch.Generator().manual_seed(step_seed(args.seed, step, rank))
    device = next(model.parameters()).device
    config = getattr(model, "module", model).config
    canvas_length, vocab = config.canvas_length, config.text_config.vocab_size
    groups = step_examples(step, args.seed, rank, args.batch_short, args.batch_long)
    weights = group_weights(groups)
    total = 0.0
    for group, examples in groups.items():
        layout = LAYOUTS[group]
        canvases = gemma_span(layout, canvas_length) // canvas_length
        canvas = int(torch.randint(canvases, (1,), generator=gen))
        ids, mask, target = gemma_batch(tokenizer, examples, layout, canvas, canvas_length)
        batch = len(examples)
        u = (torch.rand(1, generator=gen) + torch.arange(batch) / batch) % 1.0
        t = MASK_EPS + (1 - MASK_EPS) * u
        redraw = torch.rand(target.shape, generator=gen) < t[:, None]
        noisy = torch.where(redraw, torch.randint(vocab, target.shape, generator=gen), target)
        conditioned = torch.rand(batch, generator=gen) < SELF_CONDITIONING_PROB
        ids, mask, noisy, target = ids.to(device), mask.to(device), noisy.to(device), target.to(device)
        previous = None
        if conditioned.any():
            with torch.no_grad():
                previous = denoiser_logits(model, ids, mask, noisy)
        logits = denoiser_logits(model, ids, mask, noisy, previous,
                                 conditioned.to(device) if previous is not None else None)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))
        total = total + loss * weights[group]
    return total
