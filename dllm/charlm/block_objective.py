"""The block-diffusion objective of a block-causal text model (BD3-LM's vectorised form).

A block-causal model decodes block ``b`` seeing the prompt and blocks ``< b`` clean, and block ``b`` partly masked.
One forward pass trains every block at once: the input is the clean sequence followed by a noisy copy of its span
(``[B, P + 2L]``), the copy at the span's own positions, under a mask where

- the clean part is block-causal (what the exact KV cache keeps: the prompt, then each block over the earlier ones);
- noisy block ``b`` reads the clean prompt and clean blocks ``< b``, and itself; never another noisy block.

Each block of each example is masked at its own rate ``t ~ U(eps, 1)``; the loss is LLaDA's (cross-entropy on the
masked tokens weighted by ``1/t``, divided by the span length), on the noisy copy only.
"""

from __future__ import annotations

import torch

from .objective import MASK_EPS, step_batches


def block_diffusion_inputs(model, ids: torch.Tensor, attn: torch.Tensor, prompt_length: int, noisy_span: torch.Tensor):
    """``(input_ids [B, P+2L], attention_mask [B, 1, P+2L, P+2L] bool, position_ids [B, P+2L])`` of the clean
    sequence ``ids`` ``[B, P+L]`` (padding 0 in ``attn``) followed by ``noisy_span`` ``[B, L]``."""
    batch, total = ids.shape
    span = total - prompt_length
    positions = torch.cat([torch.arange(total), torch.arange(prompt_length, total)]).to(ids.device)
    blocks = model.block_of(positions)
    noisy = torch.cat([torch.zeros(total, dtype=torch.bool), torch.ones(span, dtype=torch.bool)]).to(ids.device)
    q_block, k_block = blocks[:, None], blocks[None, :]
    q_noisy, k_noisy = noisy[:, None], noisy[None, :]
    allowed = torch.where(q_noisy, torch.where(k_noisy, k_block == q_block, k_block < q_block),
                          ~k_noisy & (k_block <= q_block))
    keys = torch.cat([attn.bool(), torch.ones(batch, span, dtype=torch.bool, device=ids.device)], dim=1)
    keys &= torch.cat([ids, noisy_span], dim=1) != model.config.pad_token_id
    mask = allowed[None, None] & keys[:, None, None, :]
    return torch.cat([ids, noisy_span], dim=1), mask, positions[None].expand(batch, -1)


def block_training_loss(model, tokenizer, step: int, args, rank: int) -> torch.Tensor:
    """The loss of training step ``step`` (a scalar to call ``backward`` on); layout groups weigh as in
    :func:`.objective.training_loss`."""
    device = next(model.parameters()).device
    inner = getattr(model, "module", model)
    block_length = inner.config.block_length
    total = 0.0
    for gen, layout, ids, attn, weight in step_batches(tokenizer, step, args, rank):
        batch, span = ids.shape[0], layout.span_length
        num_blocks = -(-span // block_length)
        t_block = MASK_EPS + (1 - MASK_EPS) * torch.rand(batch, num_blocks, generator=gen)
        t = t_block.repeat_interleave(block_length, dim=1)[:, :span]  # [B, L]: each token its block's rate
        clean = ids[:, layout.prompt_length:]
        masked = torch.rand(clean.shape, generator=gen) < t
        noisy_span = torch.where(masked, torch.full_like(clean, tokenizer.mask_token_id), clean)
        x, mask, positions = block_diffusion_inputs(inner, ids, attn, layout.prompt_length, noisy_span)
        logits = model(x.to(device), attention_mask=mask.to(device), position_ids=positions.to(device)).logits
        noisy_logits = logits[:, layout.seq_length:]
        ce = torch.nn.functional.cross_entropy(noisy_logits[masked.to(device)].float(), clean[masked].to(device),
                                               reduction="none")
        loss = (ce / t[masked].to(device)).sum() / span
        total = total + loss / batch * weight
    return total
