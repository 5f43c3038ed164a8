"""Dream-style masked-diffusion decoding: shifted logits, the whole span as one block.

Dream is initialised from an autoregressive model, so the logits at position ``i`` predict token ``i + 1``:
the loop shifts them right by one (position 0 keeps its own). Timesteps run ``linspace(1, eps, steps + 1)``;
at step ``i`` (from ``t`` to ``s``) a fraction ``1 - s/t`` of the still-masked tokens is committed, and the
last step commits everything left. ``alg`` picks which:

- ``origin``: each masked token is committed independently with probability ``1 - s/t`` (random order);
- ``maskgit_plus``: the most probable tokens first;
- ``topk_margin``: the largest top-1 minus top-2 probability margin first;
- ``entropy``: the lowest-entropy positions first.

With ``alg_temp > 0`` the confidence-ordered algorithms sample positions from ``softmax(confidence / alg_temp)``
instead of taking the top. These follow the public Dream ``diffusion_generate``, with two deliberate differences:
the transfer count is per sample rather than the batch average (identical while every sample has the same number of
masks: no sample has halted and no step committed the mask token itself, which leaves its position masked, so that
sample's count falls behind the others'), and ``entropy`` uses the exact entropy rather than ``log(p + 1e-10)``.
Confidences are ranked over prompt plus span, as there, so exact ties break the same way.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..common.schedules import progress
from .commit_rule import CommitRule, eos_tail
from .decoding import call_model, check_inputs, record_trace, span_stats, topk_commit
from .halting import HaltingRule, aggregate_margin
from .output import GenerationOutput

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def _filter_logits(logits: torch.Tensor, temperature: float, top_p: Optional[float], top_k: Optional[int]):
    """Dream's sampling transform: temperature, then top-p, then top-k (filtered entries become -inf)."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum > top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


@torch.no_grad()
def dream_generate(
    model,
    input_ids: torch.Tensor,
    *,
    gen_length: int,
    steps: int,
    mask_id: Optional[int] = None,
    alg: str = "origin",
    alg_temp: Optional[float] = None,
    temperature: float = 0.0,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    eps: float = 1e-3,
    attention_mask: Optional[torch.Tensor] = None,
    halting: Optional[HaltingRule] = None,
    generator: Optional[torch.Generator] = None,
    return_trace: bool = False,
) -> GenerationOutput:
    """Decode ``gen_length`` tokens after each prompt with a Dream-style (shifted-logit) model.

    Args:
        model: maps ``input_ids`` ``[B, N]`` (plus, when the batch is padded, a ``[B, 1, N, N]`` boolean
            ``attention_mask`` and ``position_ids``, as Dream takes them) to ``.logits`` ``[B, N, V]`` where
            position ``i`` predicts token ``i + 1``.
        input_ids: ``[B, P]`` int64 prompts, left-padded (pad positions 0 in ``attention_mask``).
        gen_length: tokens to generate (Dream's ``max_new_tokens``).
        steps: diffusion steps.
        mask_id: the mask token id (required).
        alg, alg_temp: the commit order (see the module docstring).
        temperature, top_p, top_k: token sampling; ``temperature=0`` is greedy.
        eps: the final timestep.
        attention_mask: ``[B, P]``, 0 at padding. With padding, positions are counted from each row's first
            real token, as Dream does.
        halting: a halting rule (e.g. ``SchED``), decided per sample; None runs every step. A
            :class:`~diffexit.dllm.commit_rule.CommitRule` (its block is the whole span) in ``commit`` mode also
            commits every masked token it clears and fills an end-of-text tail that clears; a sample whose masks
            are all committed stops.
        generator: RNG for sampling and for ``origin``'s random commits.
        return_trace: record a :class:`TraceStep` per sample per step.
    """
    check_inputs(model, input_ids, attention_mask, gen_length=gen_length, steps=steps, mask_id=mask_id,
                 temperature=temperature)
    if alg not in ALGS:
        raise ValueError(f"alg must be one of {ALGS}, got {alg!r}")
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    if alg_temp is not None and alg_temp < 0:
        raise ValueError(f"alg_temp must be >= 0, got {alg_temp}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")

    batch, plen = input_ids.shape
    device = input_ids.device
    x = torch.full((batch, plen + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :plen] = input_ids
    position_ids = None
    if attention_mask is not None and (attention_mask == 0).any():
        attention_mask = torch.cat(
            [attention_mask, torch.ones(batch, gen_length, dtype=attention_mask.dtype, device=device)], dim=1)
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        # Dream's attention takes a [B, 1, N, N] boolean mask (query and key both real); a 2-D padding mask
        # would be broadcast as [N, N] by its SDPA call.
        keep = attention_mask.bool()
        attention_mask = keep[:, None, None, :] & keep[:, None, :, None]
    else:
        attention_mask = None
    timesteps = torch.linspace(1, eps, steps + 1, device=device)

    nfe = torch.zeros(batch, dtype=torch.long, device=device)
    halt_step = torch.full((batch,), -1, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    trace = [[] for _ in range(batch)] if return_trace else None
    if isinstance(halting, CommitRule):
        halting.bind(model, gen_length)
    commits = isinstance(halting, CommitRule) and halting.commits
    if halting is not None:
        halting.start(batch, gen_length, device, steps)
    neg_inf = torch.tensor(float("-inf"), device=device)

    for i in range(steps):
        rows = (~done).nonzero().flatten()
        if len(rows) == 0:
            break
        extra = {} if position_ids is None else {"position_ids": position_ids[rows]}
        logits = call_model(model, x[rows], None if attention_mask is None else attention_mask[rows], **extra)
        nfe[rows] += 1
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        span_logits = logits[:, plen:]
        step = torch.full((len(rows),), i, dtype=torch.long, device=device)
        stats = span_stats(span_logits, step, rows, mask_id)
        span = x[rows, plen:]
        masked = span == mask_id
        t, s = timesteps[i], timesteps[i + 1]
        last = i == steps - 1

        if halting is not None:
            decision = halting.decide(stats, masked, step, rows)
            halt = decision.halt.to(device)
        else:
            halt = torch.zeros(len(rows), dtype=torch.bool, device=device)

        if temperature == 0 and top_p is None and top_k is None:
            x0 = stats.top1_id
            confidence = {"maskgit_plus": stats.top1_prob, "topk_margin": stats.prob_margin,
                          "entropy": -stats.entropy}.get(alg)
        else:
            # Dream samples only at temperature > 0; with top-p / top-k alone it takes the filtered argmax.
            probs = _filter_logits(span_logits.float(), temperature, top_p, top_k).softmax(-1)
            if temperature > 0:
                flat = probs.reshape(-1, probs.shape[-1])
                x0 = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
            else:
                x0 = probs.argmax(-1)
            if alg == "topk_margin":
                top2 = probs.topk(2, -1).values
                confidence = top2[..., 0] - top2[..., 1]
            elif alg == "entropy":
                confidence = (probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
            else:
                confidence = probs.gather(-1, x0[..., None]).squeeze(-1)

        n_masked = masked.sum(-1)
        going = ~halt
        if alg == "origin":
            p_transfer = 1.0 if last else float(1 - s / t)
            draw = torch.ones(span.shape, device=device)
            # One draw per sample still going, in batch order, as the per-sample loop drew them.
            draw[going] = torch.rand((int(going.sum()), gen_length), device=device, generator=generator)
            pick = masked & (draw < p_transfer) & going[:, None]
        else:
            k = n_masked if last else (n_masked * float(1 - s / t)).long()
            k = torch.where(going, k, 0)
            conf = torch.where(masked, confidence.float(), neg_inf)
            if alg_temp:
                pick = _sample_positions(conf, k, alg_temp, generator)
            else:
                # The reference ranks over prompt plus span, with -inf outside the masks; ranking the same
                # sequence keeps torch.topk's tie order.
                full = torch.full((len(rows), plen + gen_length), float("-inf"), device=device)
                full[:, plen:] = conf
                pick = topk_commit(full, k)[:, plen:]
        tail = torch.zeros_like(pick)
        if commits:
            pick |= halting.clear & going[:, None]
            tail = eos_tail(span, stats.top1_id, halting.clear, mask_id, halting.eos_token_ids) & going[:, None]
        # A halted sample takes this step's argmax at every remaining mask.
        fill = pick | tail | (masked & halt[:, None])
        x[rows, plen:] = torch.where(fill, torch.where(halt[:, None] | tail, stats.top1_id, x0), span)
        halt_step[rows] = torch.where(halt, i, halt_step[rows])
        done[rows] = halt | (commits & ~(x[rows, plen:] == mask_id).any(-1))

        if trace is not None:
            value = (decision.value if halting is not None
                     else aggregate_margin(stats.logit_margin, masked, "mean"))
            record_trace(trace, rows, step, progress(step, steps), value,
                         decision.threshold if halting is not None else None, fill.sum(-1), n_masked, halt,
                         x[rows, plen:])

    return GenerationOutput(sequences=x, nfe=nfe.cpu(), halt_step=halt_step.cpu(), prompt_length=plen, trace=trace)


def _sample_positions(conf: torch.Tensor, k: torch.Tensor, alg_temp: float, generator) -> torch.Tensor:
    """``k[j]`` positions of each row drawn from ``softmax(conf / alg_temp)`` without replacement (bool ``[A, L]``);
    rows asking for the same count share one draw."""
    pick = torch.zeros_like(conf, dtype=torch.bool)
    for value in torch.unique(k).tolist():
        if value > 0:
            rows = (k == value).nonzero().flatten()
            index = torch.multinomial(torch.softmax(conf[rows] / alg_temp, -1), value, generator=generator)
            pick[rows] = pick[rows].scatter(1, index, True)
    return pick
