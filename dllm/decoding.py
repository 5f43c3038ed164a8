"""Pieces both decoding loops share: input checks, the model call, span statistics and Gumbel sampling."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..kernels import token_stats


def check_inputs(model, input_ids, attention_mask, *, gen_length: int, steps: int, mask_id, temperature: float):
    """Raise a ValueError naming the bad argument."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        got = (f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor)
               else type(input_ids).__name__)
        raise ValueError(f"input_ids must be a 2-D int64 tensor [batch, prompt_length], got {got}")
    if input_ids.shape[0] == 0:
        raise ValueError("input_ids has an empty batch")
    if not isinstance(gen_length, int) or gen_length <= 0:
        raise ValueError(f"gen_length must be a positive int, got {gen_length!r}")
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if mask_id is None:
        raise ValueError("mask_id is required: pass the tokenizer's mask token id (tokenizer.mask_token_id)")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(mask_id, int) or mask_id < 0 or (vocab is not None and mask_id >= vocab):
        raise ValueError(f"mask_id must be a token id in [0, {vocab if vocab is not None else 'vocab_size'}), "
                         f"got {mask_id!r}")
    if (input_ids == mask_id).any():
        rows = (input_ids == mask_id).any(-1).nonzero().flatten().tolist()
        raise ValueError(f"input_ids already contain mask tokens (mask_id={mask_id}) in rows {rows}; "
                         f"the prompt must be fully known")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must match input_ids "
                         f"{tuple(input_ids.shape)}")


def call_model(model, x: torch.Tensor, attention_mask: Optional[torch.Tensor], **kwargs) -> torch.Tensor:
    """``model(x, attention_mask=...).logits`` as float logits ``[A, N, V]``; the mask is passed only if given."""
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    out = model(x, **kwargs)
    return out.logits if hasattr(out, "logits") else out


def span_stats(span_logits: torch.Tensor, step: int, rows: torch.Tensor, mask_id: int):
    """Token statistics of ``span_logits`` ``[A, L, V]``; NaN logits raise, naming the step and sample."""
    if span_logits.shape[-1] <= mask_id:
        raise ValueError(f"mask_id={mask_id} is outside the model's vocabulary of {span_logits.shape[-1]}")
    stats = token_stats(span_logits)
    bad = torch.isnan(stats.entropy).any(-1)
    if bad.any():
        raise FloatingPointError(
            f"the model returned NaN logits at step {step} for sample(s) {rows[bad.cpu()].tolist()} of the batch"
        )
    return stats


def suppress(logits: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """Forbid ``token_ids`` (e.g. EOS / EoT) by setting their logits to ``-inf`` (returns a copy)."""
    if not token_ids:
        return logits
    logits = logits.clone()
    logits[..., list(token_ids)] = float("-inf")
    return logits


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """LLaDA's Gumbel-max trick, in float64 because low-precision Gumbel noise degrades sampling quality.

    ``argmax(exp(l) / (-log u)^T)`` is a sample from ``softmax(l / T)``. Returns logits unchanged at T = 0.
    """
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return logits.exp() / (-torch.log(noise)) ** temperature
