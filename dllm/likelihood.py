"""LLaDA's Monte-Carlo estimate of a continuation's log-likelihood under a bidirectional masked-diffusion LM.

A masked-diffusion LM gives no exact ``log p(c | prompt)``; LLaDA (``get_log_likelihood.py`` and its lm-eval
harness) estimates the bound its training optimises. For a continuation ``c`` of ``L`` tokens::

    log p(c | prompt) >= E_{l ~ U{1..L}} E_{M: l of the L positions} [ (L / l) * sum_{i in M} log p(c_i | prompt, c with M masked) ]

Each Monte-Carlo sample masks ``l`` random positions of the continuation (never the prompt), runs the model once,
and scores the masked tokens' log-probabilities weighted by ``L / l``, the inverse of the mask ratio. The ``l`` of
a batch of ``b`` samples are stratified, as LLaDA draws them: one ``k ~ U{1..L}``, then
``round(k + j L / b)`` for ``j < b``, wrapped into ``1..L``. The estimate averages ``mc_num`` samples (LLaDA's
default: 128, 32 per forward pass). With one token (``L = 1``) every sample masks it, and the estimate is exactly
``log p(c | prompt)``.

:func:`greedy_matches` is LLaDA's ``is_greedy``: decoding ``L`` tokens after the prompt, one per step, the most
confident first, gives ``c``.

Bidirectional models only: a block-causal model (:func:`~diffexit.dllm.exact_cache.block_causal_layout`) is trained
to denoise one block at a time behind clean earlier blocks, which this estimator does not do, so it is refused.
"""

from __future__ import annotations

from typing import Optional

import torch

from .decoding import call_model
from .exact_cache import block_causal_layout
from .generate import generate

MC_NUM = 128  # LLaDA's lm-eval default
BATCH_SIZE = 32  # LLaDA's samples per forward pass


def check_bidirectional(model) -> None:
    """``ValueError`` naming the fix when ``model`` is block-causal, where LLaDA's estimator does not apply."""
    if block_causal_layout(model) is not None:
        raise ValueError("LLaDA's log-likelihood estimator masks the whole continuation at once, and a block-causal "
                         "model denoises one block at a time behind clean earlier blocks: score log-likelihoods "
                         "with a bidirectional model (charlm, LLaDA), or run a generate_until task")


def mask_counts(length: int, batch: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """How many of ``length`` positions each of ``batch`` samples masks: int64 ``[batch]`` in ``1..length``,
    LLaDA's stratified draw (module docstring)."""
    k = int(torch.randint(1, length + 1, (), generator=generator))
    counts = torch.round(torch.linspace(float(k), k + (batch - 1) * (length / batch), steps=batch)).long()
    return (counts - 1) % length + 1


def _check(model, prompt_ids: torch.Tensor, continuation_ids: torch.Tensor, prompt_mask, mask_id: int) -> None:
    check_bidirectional(model)
    for name, ids in (("prompt_ids", prompt_ids), ("continuation_ids", continuation_ids)):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype != torch.long:
            raise ValueError(f"{name} must be a 1-D int64 tensor of token ids")
    if len(continuation_ids) == 0:
        raise ValueError("continuation_ids is empty: there is nothing to score")
    if (continuation_ids == mask_id).any() or (prompt_ids == mask_id).any():
        raise ValueError(f"the prompt or the continuation holds the mask token (id {mask_id}); both must be known "
                         f"text")
    if prompt_mask is not None and prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_mask has shape {tuple(prompt_mask.shape)}; it must match prompt_ids "
                         f"{tuple(prompt_ids.shape)}")


@torch.no_grad()
def loglikelihood(model, prompt_ids: torch.Tensor, continuation_ids: torch.Tensor, *, mask_id: int,
                  mc_num: int = MC_NUM, batch_size: int = BATCH_SIZE, prompt_mask: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None) -> float:
    """LLaDA's Monte-Carlo estimate of ``log p(continuation | prompt)``, in nats.

    Args:
        model: a bidirectional masked-diffusion LM mapping ``input_ids`` ``[B, N]`` (and ``attention_mask=``) to
            ``.logits`` ``[B, N, V]``.
        prompt_ids: int64 ``[P]``; ``continuation_ids``: int64 ``[L]``, ``L >= 1``.
        mask_id: the mask token id.
        mc_num: Monte-Carlo samples, a multiple of ``batch_size``.
        batch_size: samples per forward pass (the stratification runs within each).
        prompt_mask: ``[P]``, 0 at prompt padding (the embedded model's left padding), or None.
        generator: the RNG of the mask counts and positions (seed it for a deterministic estimate).
    """
    _check(model, prompt_ids, continuation_ids, prompt_mask, mask_id)
    for name, value in (("mc_num", mc_num), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if mc_num % batch_size:
        raise ValueError(f"mc_num={mc_num} must be a multiple of batch_size={batch_size} (each forward pass draws "
                         f"one stratified batch); use mc_num={max(batch_size, mc_num // batch_size * batch_size)}")
    device = prompt_ids.device
    plen, length = len(prompt_ids), len(continuation_ids)
    seq = torch.cat([prompt_ids, continuation_ids]).expand(batch_size, -1)
    attention = None if prompt_mask is None else torch.cat(
        [prompt_mask.to(device), torch.ones(length, dtype=prompt_mask.dtype, device=device)]).expand(batch_size, -1)
    total = 0.0
    for _ in range(mc_num // batch_size):
        counts = mask_counts(length, batch_size, generator)
        order = torch.stack([torch.randperm(length, generator=generator) for _ in range(batch_size)])
        masked = (order < counts[:, None]).to(device)  # `counts[j]` random positions of row j
        noisy = seq.clone()
        noisy[:, plen:][masked] = mask_id
        logits = call_model(model, noisy, attention)[:, plen:].float()
        token_logp = logits.log_softmax(-1).gather(-1, seq[:, plen:, None]).squeeze(-1)
        weight = length / counts.to(device=device, dtype=torch.float32)
        total += float(((token_logp * masked).sum(-1) * weight).sum())
    return total / mc_num


def greedy_matches(model, prompt_ids: torch.Tensor, continuation_ids: torch.Tensor, *, mask_id: int,
                   prompt_mask: Optional[torch.Tensor] = None) -> bool:
    """LLaDA's ``is_greedy``: whether greedy decoding of ``len(continuation_ids)`` tokens after the prompt, one per
    step, the most confident first (:func:`~diffexit.dllm.generate`, one block), gives the continuation."""
    _check(model, prompt_ids, continuation_ids, prompt_mask, mask_id)
    length = len(continuation_ids)
    out = generate(model, prompt_ids[None], gen_length=length, steps=length, mask_id=mask_id,
                   attention_mask=None if prompt_mask is None else prompt_mask[None])
    return bool(torch.equal(out.generated[0], continuation_ids.to(out.generated.device)))
