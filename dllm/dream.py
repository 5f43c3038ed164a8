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
instead of taking the top. These follow the public Dream ``diffusion_generate``, with two deliberate
differences: the transfer count is per sample rather than the batch average (identical when no sample has
halted), and ``entropy`` uses the exact entropy rather than ``log(p + 1e-10)``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .decoding import call_model, check_inputs, span_stats
from .halting import HaltingRule, aggregate_margin
from .output import GenerationOutput, TraceStep

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
        halting: a halting rule (e.g. ``SchED``), decided per sample; None runs every step.
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

    nfe = torch.zeros(batch, dtype=torch.long)
    halt_step = torch.full((batch,), -1, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    trace = [[] for _ in range(batch)] if return_trace else None
    if halting is not None:
        halting.start(batch, gen_length, device)

    for i in range(steps):
        rows = (~done).nonzero().flatten()
        if len(rows) == 0:
            break
        dev_rows = rows.to(device)
        extra = {} if position_ids is None else {"position_ids": position_ids[dev_rows]}
        logits = call_model(model, x[dev_rows], None if attention_mask is None else attention_mask[dev_rows],
                            **extra)
        nfe[rows] += 1
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        span_logits = logits[:, plen:]
        stats = span_stats(span_logits, i, rows, mask_id)
        masked = x[dev_rows, plen:] == mask_id
        t, s = timesteps[i], timesteps[i + 1]
        last = i == steps - 1
        prog = torch.full((len(rows),), 0.0 if steps == 1 else i / (steps - 1), device=device)

        if halting is not None:
            decision = halting.decide(stats, masked, prog, dev_rows)
            halt = decision.halt.cpu()
        else:
            halt = torch.zeros(len(rows), dtype=torch.bool)

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

        for j, r in enumerate(rows.tolist()):
            masked_j = masked[j]
            n_masked = int(masked_j.sum())
            span = x[r, plen:]
            if halt[j]:
                span[masked_j] = stats.top1_id[j][masked_j]
                committed, halt_step[r], done[r] = n_masked, i, True
            elif alg == "origin":
                p_transfer = 1.0 if last else float(1 - s / t)
                pick = masked_j & (torch.rand(gen_length, device=device, generator=generator) < p_transfer)
                span[pick] = x0[j][pick]
                committed = int(pick.sum())
            else:
                k = n_masked if last else int(n_masked * float(1 - s / t))
                committed = k
                if k > 0:
                    conf = torch.where(masked_j, confidence[j].float(), torch.tensor(float("-inf"), device=device))
                    if alg_temp:
                        idx = torch.multinomial(torch.softmax(conf / alg_temp, -1), k, generator=generator)
                    else:
                        idx = conf.topk(k).indices
                    span[idx] = x0[j][idx]
            if trace is not None:
                value = (decision.value[j] if halting is not None
                         else aggregate_margin(stats.logit_margin[j:j + 1], masked[j:j + 1], "mean")[0])
                trace[r].append(TraceStep(
                    step=i, progress=float(prog[j]), margin=float(value),
                    threshold=float(decision.threshold[j]) if halting is not None else None,
                    committed=committed, masked_before=n_masked, halted=bool(halt[j]), tokens=span.tolist(),
                ))

    return GenerationOutput(sequences=x, nfe=nfe, halt_step=halt_step, prompt_length=plen, trace=trace)
