"""The masked-diffusion objective of the embedded text model: LLaDA's / MDLM's.

Per example, draw ``t ~ U(eps, 1)`` (stratified over the batch, which lowers the variance without changing the
expectation), mask each answer-span token with probability ``t`` (never the prompt), and take the cross-entropy on
the masked tokens weighted by ``1 / t``, summed and divided by the span length. With probability ``truncate_prob`` a
group's batch is also cut after a random multiple of ``TRUNCATE_QUANTUM`` positions inside the span, which is what
diffusers' ``LLaDA2Pipeline`` shows the model: the prefix up to the end of the current block, and nothing after it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import encode_examples, group_weights, step_examples, step_seed
from .tasks import LAYOUTS

MASK_EPS = 1e-3
TRUNCATE_QUANTUM = 4  # pipelines' block lengths are multiples of this, so their windows end on such positions


def corrupt(input_ids: torch.Tensor, prompt_length: int, t: torch.Tensor, mask_id: int, generator: torch.Generator):
    """Mask each span token (positions >= ``prompt_length``) with probability ``t`` ``[B]``.

    Returns ``(noisy_ids, masked)``: ``[B, N]`` int64 and bool.
    """
    draw = torch.rand(input_ids.shape, generator=generator)
    masked = draw < t[:, None]
    masked[:, :prompt_length] = False
    return torch.where(masked, torch.full_like(input_ids, mask_id), input_ids), masked


def diffusion_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
                   span_length: int) -> torch.Tensor:
    """Sum over the batch of ``sum_masked CE / t`` per example divided by its span length (a scalar)."""
    ce = F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")
    weights = (1.0 / t)[:, None].expand_as(masked)[masked]
    return (ce * weights).sum() / span_length


def step_batches(tokenizer, step: int, args, rank: int):
    """The batches of training step ``step``: ``(generator, layout, ids, attention_mask, weight)`` per layout group,
    ids and mask ``[B, N]``; the one generator, seeded by ``(seed, step, rank)``, draws every mask of the step, and
    ``weight`` is the group's tasks' share of ``TASK_SHARES``."""
    gen = torch.Generator().manual_seed(step_seed(args.seed, step, rank))
    groups = step_examples(step, args.seed, rank, args.batch_short, args.batch_long)
    weights = group_weights(groups)
    for group, examples in groups.items():
        layout = LAYOUTS[group]
        ids, attn = encode_examples(tokenizer, examples, layout)
        yield gen, layout, ids, attn, weights[group]


def training_loss(model, tokenizer, step: int, args, rank: int) -> torch.Tensor:
    """The loss of training step ``step`` (a scalar to call ``backward`` on).

    Each layout group's loss is its per-example mean, weighted by its tasks' share of ``TASK_SHARES``.
    """
    device = next(model.parameters()).device
    total = 0.0
    for gen, layout, ids, attn, weight in step_batches(tokenizer, step, args, rank):
        batch = ids.shape[0]
        # Stratified t: one uniform offset, batch-many evenly spaced points, all in [eps, 1).
        u = (torch.rand(1, generator=gen) + torch.arange(batch) / batch) % 1.0
        t = MASK_EPS + (1 - MASK_EPS) * u
        length = layout.seq_length
        if torch.rand(1, generator=gen).item() < args.truncate_prob:
            cuts = [c for c in range(layout.prompt_length + 1, layout.seq_length) if c % TRUNCATE_QUANTUM == 0]
            length = cuts[int(torch.randint(len(cuts), (1,), generator=gen))]
        ids, attn = ids[:, :length], attn[:, :length]
        noisy, masked = corrupt(ids, layout.prompt_length, t, tokenizer.mask_token_id, gen)
        logits = model(noisy.to(device), attention_mask=attn.to(device)).logits
        loss = diffusion_loss(logits, ids.to(device), masked.to(device), t.to(device), length - layout.prompt_length)
        total = total + loss / batch * weight
    return total
