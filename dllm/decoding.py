"""Pieces both decoding loops share: input checks, the model call, span statistics, Gumbel sampling, the commit
rule, and the trace record."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..kernels import TokenStats, token_stats


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
    vocab = vocab_size(model)
    if isinstance(mask_id, bool) or not isinstance(mask_id, int) or mask_id < 0 or (vocab is not None and mask_id >= vocab):
        raise ValueError(f"mask_id must be a token id in [0, {vocab if vocab is not None else 'vocab_size'}), "
                         f"got {mask_id!r}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must match input_ids "
                         f"{tuple(input_ids.shape)}")
    if vocab is not None and input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab):
        bad = ((input_ids < 0) | (input_ids >= vocab)).any(-1).nonzero().flatten().tolist()
        raise ValueError(f"input_ids hold token ids outside the model's vocabulary [0, {vocab}) in rows {bad}; "
                         f"encode the prompts with the model's own tokenizer")
    is_mask = input_ids == mask_id
    if is_mask.any():
        rows = is_mask.any(-1).nonzero().flatten().tolist()
        if attention_mask is not None and not (is_mask & (attention_mask != 0)).any():
            raise ValueError(f"the prompts are padded with the mask token (mask_id={mask_id}) in rows {rows}: the "
                             f"loop would decode the padding; pad with another token (the tokenizer's pad or EOS "
                             f"token), as LLaDA's reference requires")
        raise ValueError(f"input_ids already contain mask tokens (mask_id={mask_id}) in rows {rows}; "
                         f"the prompt must be fully known")
    check_finite_nonnegative("temperature", temperature, "0: greedy")


def check_finite_nonnegative(name: str, value, zero_means: str) -> None:
    """``ValueError`` unless ``value`` is a finite number >= 0 (anything ``float()`` takes: numpy and 0-d torch
    scalars too); ``zero_means`` says what 0 does, for the message."""
    try:
        ok = math.isfinite(value) and value >= 0
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a finite number >= 0 ({zero_means}), got {value!r}")


def vocab_size(model) -> Optional[int]:
    """The model's vocabulary size, known before any forward pass: its config's, else its input embedding's; None
    for a model that shows neither (its first forward pass then finds out)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None:
        return int(vocab)
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if embedding is None and isinstance(model, torch.nn.Module):
        # A plain module: its first embedding table is, by convention, the tokens'.
        embedding = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    return int(embedding.num_embeddings) if embedding is not None and hasattr(embedding, "num_embeddings") else None


def call_model(model, x: torch.Tensor, attention_mask: Optional[torch.Tensor], **kwargs) -> torch.Tensor:
    """``model(x, attention_mask=...).logits`` as float logits ``[A, N, V]``; the mask is passed only if given."""
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    out = model(x, **kwargs)
    return out.logits if hasattr(out, "logits") else out


def span_stats(span_logits: torch.Tensor, steps: torch.Tensor, rows: torch.Tensor, mask_id: int) -> TokenStats:
    """Token statistics of ``span_logits`` ``[A, L, V]``; NaN logits raise, naming the step and the sample
    (``steps`` and ``rows`` ``[A]``: each row's forward-pass index and its sample's place in the batch)."""
    if span_logits.shape[-1] <= mask_id:
        raise ValueError(f"mask_id={mask_id} is outside the model's vocabulary of {span_logits.shape[-1]}")
    stats = token_stats(span_logits)
    bad = torch.isnan(stats.entropy).any(-1)
    if bad.any():
        raise FloatingPointError(
            f"the model returned NaN logits at step {int(steps[bad][0])} for sample(s) "
            f"{rows[bad.to(rows.device)].tolist()} of the batch"
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


def topk_commit(confidence: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Which positions to commit: in each row of ``confidence`` ``[A, N]`` (``-inf`` where nothing may be committed),
    the ``k[j]`` most confident, as the references pick them.

    The references call ``torch.topk`` row by row over the whole sequence; rows asking for the same ``k`` share one
    batched call, which picks what the row-by-row calls pick, exact ties included (``tests/test_dllm_generate.py``
    checks it). Returns bool ``[A, N]``.
    """
    pick = torch.zeros_like(confidence, dtype=torch.bool)
    for value in torch.unique(k).tolist():
        if value <= 0:
            continue
        rows = (k == value).nonzero().flatten()
        index = torch.topk(confidence[rows], value, dim=-1).indices
        pick[rows] = pick[rows].scatter(1, index, True)
    return pick


class LatestStats:
    """The newest token statistics of every sample's span, ``[B, L]`` per field, on the logits' device.

    A forward pass refreshes the positions it covered (:meth:`update`); a decode with a dual KV cache covers only
    the current block, so the rest of the span keeps the statistics of the last full pass.
    """

    def __init__(self, batch: int, span_length: int, device):
        self.ids = torch.zeros(batch, span_length, dtype=torch.long, device=device)
        self.floats = torch.zeros(len(TokenStats._fields) - 1, batch, span_length, dtype=torch.float32, device=device)

    def update(self, rows: torch.Tensor, start: int, stats: TokenStats) -> None:
        """Write ``stats`` (fields ``[A, W]``) at span positions ``start .. start + W`` of samples ``rows``."""
        width = stats.top1_id.shape[-1]
        self.ids[rows, start:start + width] = stats.top1_id
        self.floats[:, rows, start:start + width] = torch.stack(stats[1:])

    def of(self, rows: torch.Tensor) -> TokenStats:
        """The statistics of samples ``rows``: :class:`~diffexit.kernels.TokenStats`, fields ``[A, L]``."""
        return TokenStats(self.ids[rows], *self.floats[:, rows].unbind(0))


def record_trace(trace: list, rows: torch.Tensor, steps: torch.Tensor, progress: torch.Tensor, value: torch.Tensor,
                 threshold: Optional[torch.Tensor], committed: torch.Tensor, masked_before: torch.Tensor,
                 halted: torch.Tensor, spans: torch.Tensor, stopped: Optional[torch.Tensor] = None) -> None:
    """Append one :class:`~diffexit.dllm.output.TraceStep` per active sample (``rows`` ``[A]``, the rest ``[A]``
    or, for ``spans``, ``[A, L]``; ``stopped``, None where nothing stops at an end-of-text block); each field is
    moved to the host once."""
    from .output import TraceStep

    stopped = torch.zeros_like(halted) if stopped is None else stopped
    fields = [t.tolist() for t in (rows, steps, progress, value, committed, masked_before, halted, spans, stopped)]
    limits = threshold.tolist() if threshold is not None else [None] * len(fields[0])
    for r, step, prog, val, comm, before, halt, span, stop, limit in zip(*fields, limits):
        trace[r].append(TraceStep(step=step, progress=prog, margin=val, threshold=limit, committed=comm,
                                  masked_before=before, halted=halt, tokens=span, stopped=stop))
