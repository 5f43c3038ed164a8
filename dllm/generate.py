"""LLaDA-style masked-diffusion decoding, with optional halting and parallel commits.

The loop, top to bottom, for every step of every sample still decoding:

1. run the model on prompt + span (with classifier-free guidance if asked);
2. ``token_stats`` of the span logits: argmax, its probability, the top-1 minus top-2 margin;
3. the halting rule (if any) looks at the masked span's margins and progress; a sample that halts gets every
   remaining mask, in every block, filled with the current argmax, and leaves the batch;
4. otherwise commit the most confident masked tokens of the current block: the scheduled number (steps split
   evenly, remainder to the earliest steps), or with ``parallel_threshold`` every token at least that probable
   if there are more of them;
5. move to the next block when this one's steps are spent or it has no masks left.

With ``halting=None``, no ``parallel_threshold`` and no suppressed tokens, greedy ``low_confidence`` decoding
is token-for-token LLaDA's reference ``generate`` (confidences in float64, as there).

Parallel commits take the larger of the scheduled count and the count above the threshold, so a block never
needs more than its scheduled steps. Fast-dLLM commits at least one token with no step cap; the two agree
when ``steps == gen_length``. Like the reference, the loop passes no ``position_ids``: a model whose positions
should skip left padding must compute them from the attention mask (the embedded model pads prompts to a
fixed length and uses absolute positions).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .decoding import add_gumbel_noise, call_model, check_inputs, span_stats, suppress
from .halting import HaltingRule, aggregate_margin
from .output import GenerationOutput, TraceStep

REMASKING = ("low_confidence", "random")


def num_transfer_tokens(masked_count: int, steps: int) -> list[int]:
    """How many tokens each of ``steps`` steps commits: an even split, the remainder to the earliest steps."""
    base, rem = divmod(masked_count, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def _check_blocks(gen_length: int, steps: int, block_length: int) -> int:
    if not isinstance(block_length, int) or block_length <= 0 or gen_length % block_length:
        divisors = [d for d in range(1, gen_length + 1) if gen_length % d == 0]
        raise ValueError(f"block_length must divide gen_length={gen_length}, got {block_length!r}; "
                         f"valid block lengths are {divisors}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        lo = steps // num_blocks * num_blocks
        options = [s for s in (lo, lo + num_blocks) if s > 0]
        raise ValueError(f"steps={steps} must be a multiple of the number of blocks ({num_blocks} = gen_length "
                         f"{gen_length} / block_length {block_length}); try steps in {options}, or another "
                         f"block_length")
    return num_blocks


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    *,
    gen_length: int,
    steps: int,
    block_length: Optional[int] = None,
    remasking: str = "low_confidence",
    temperature: float = 0.0,
    mask_id: Optional[int] = None,
    halting: Optional[HaltingRule] = None,
    attention_mask: Optional[torch.Tensor] = None,
    cfg_scale: float = 0.0,
    parallel_threshold: Optional[float] = None,
    suppress_token_ids: Sequence[int] = (),
    generator: Optional[torch.Generator] = None,
    return_trace: bool = False,
) -> GenerationOutput:
    """Decode ``gen_length`` tokens after each prompt of ``input_ids`` with a bidirectional masked-diffusion model.

    Args:
        model: maps ``input_ids`` ``[B, N]`` (and ``attention_mask=``) to an output with ``.logits`` ``[B, N, V]``.
        input_ids: ``[B, P]`` int64 prompts, left-padded to a common length (pad positions 0 in
            ``attention_mask``).
        gen_length: tokens to generate per sample.
        steps: total refinement steps (forward passes without halting), split evenly over the blocks.
        block_length: semi-autoregressive block size; must divide ``gen_length``. Default: one block.
        remasking: ``low_confidence`` (commit the most probable) or ``random`` (commit random positions).
        temperature: 0 for greedy; otherwise Gumbel-max sampling at this temperature (float64 noise).
        mask_id: the mask token id (required).
        halting: a :class:`~diffexit.dllm.halting.HaltingRule` (e.g. ``SchED``), decided per sample; None runs
            every step.
        attention_mask: ``[B, P]`` 1 for real prompt tokens, 0 for padding; the span is always attended.
        cfg_scale: classifier-free guidance; the unconditional copy has its prompt masked.
        parallel_threshold: Fast-dLLM-style parallel commits: also commit every masked token of the current
            block whose probability is at least this, so blocks can finish in fewer steps.
        suppress_token_ids: token ids whose logits are set to ``-inf`` (e.g. EOS / EoT) before anything else.
        generator: RNG for temperature sampling and random remasking.
        return_trace: record a :class:`TraceStep` per sample per forward pass.

    Returns:
        :class:`GenerationOutput` with ``sequences`` ``[B, P + gen_length]`` and ``nfe`` ``[B]``.
    """
    check_inputs(model, input_ids, attention_mask, gen_length=gen_length, steps=steps, mask_id=mask_id,
                 temperature=temperature)
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    if parallel_threshold is not None and not 0.0 < parallel_threshold <= 1.0:
        raise ValueError(f"parallel_threshold must be a probability in (0, 1], got {parallel_threshold}")
    if parallel_threshold is not None and remasking == "random":
        raise ValueError("parallel_threshold compares token probabilities; it needs remasking='low_confidence'")
    block_length = gen_length if block_length is None else block_length
    num_blocks = _check_blocks(gen_length, steps, block_length)
    steps_per_block = steps // num_blocks
    # Every span position starts masked and positions after the current block are never committed, so each
    # block starts with `block_length` masks and the per-step counts are the same for all blocks.
    schedule = num_transfer_tokens(block_length, steps_per_block)

    batch, plen = input_ids.shape
    device = input_ids.device
    x = torch.full((batch, plen + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :plen] = input_ids
    if attention_mask is not None:
        attention_mask = torch.cat(
            [attention_mask, torch.ones(batch, gen_length, dtype=attention_mask.dtype, device=device)], dim=1)

    block = torch.zeros(batch, dtype=torch.long)       # current block of each sample
    block_step = torch.zeros(batch, dtype=torch.long)  # step within that block
    nfe = torch.zeros(batch, dtype=torch.long)
    halt_step = torch.full((batch,), -1, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    trace = [[] for _ in range(batch)] if return_trace else None
    if halting is not None:
        halting.start(batch, gen_length, device)
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64, device=device)

    while not done.all():
        rows = (~done).nonzero().flatten()
        xa = x[rows.to(device)]
        am = attention_mask[rows.to(device)] if attention_mask is not None else None
        if cfg_scale > 0:
            uncond = xa.clone()
            uncond[:, :plen] = mask_id
            both = call_model(model, torch.cat([xa, uncond]), None if am is None else torch.cat([am, am]))
            cond, unc = both.chunk(2)
            logits = unc + (cfg_scale + 1) * (cond - unc)
        else:
            logits = call_model(model, xa, am)
        nfe[rows] += 1
        span_logits = suppress(logits[:, plen:], suppress_token_ids)
        stats = span_stats(span_logits, int(nfe[rows].max()) - 1, rows, mask_id)
        masked = xa[:, plen:] == mask_id

        if temperature > 0:
            x0 = add_gumbel_noise(span_logits, temperature, generator).argmax(-1)
        else:
            x0 = stats.top1_id
        rand_conf = torch.rand(x0.shape, device=device, generator=generator) if remasking == "random" else None

        # Progress on the nominal schedule (block * steps_per_block + step), so that parallel commits that
        # finish a block early also move the threshold on.
        prog = ((block[rows] * steps_per_block + block_step[rows]).float() / max(steps - 1, 1)).clamp(max=1.0)
        if halting is not None:
            decision = halting.decide(stats, masked, prog, rows)
            halt = decision.halt.cpu()
        else:
            halt = torch.zeros(len(rows), dtype=torch.bool)

        for j, r in enumerate(rows.tolist()):
            masked_j = masked[j]
            n_masked = int(masked_j.sum())
            if halt[j]:
                # Fill every remaining mask, in all remaining blocks, with this step's argmax: no extra pass.
                x[r, plen:] = torch.where(masked_j, stats.top1_id[j], x[r, plen:])
                committed, halt_step[r], done[r] = n_masked, nfe[r] - 1, True
            else:
                b0 = plen + int(block[r]) * block_length
                b1 = b0 + block_length
                blk = slice(b0 - plen, b1 - plen)
                if rand_conf is not None:
                    conf = rand_conf[j, blk].double()
                else:
                    # The reference's softmax is float64: in float32 every margin above ~17 nats rounds the
                    # probability to 1.0 and confident positions would tie. Only the current block is ranked.
                    conf = torch.softmax(span_logits[j, blk].double(), -1).gather(-1, x0[j, blk, None]).squeeze(-1)
                # The reference ranks confidences over the whole sequence with -inf outside the current
                # block's masks; doing the same keeps torch.topk's tie order identical.
                full_conf = torch.full((plen + gen_length,), float("-inf"), dtype=torch.float64, device=device)
                full_conf[b0:b1] = torch.where(masked_j[blk], conf, neg_inf)
                available = int(masked_j[blk].sum())
                k = schedule[int(block_step[r])]
                if parallel_threshold is not None:
                    k = max(k, int((full_conf >= parallel_threshold).sum()))
                k = min(k, available)
                if k > 0:
                    _, idx = torch.topk(full_conf, k)
                    x[r, idx] = x0[j, idx - plen]
                committed = k
                block_step[r] += 1
                # Only parallel commits end a block early: the reference runs every scheduled step, even
                # ones that commit nothing (steps_per_block > block_length).
                finished_early = parallel_threshold is not None and available == k
                if block_step[r] == steps_per_block or finished_early:
                    block[r] += 1
                    block_step[r] = 0
                    done[r] = block[r] == num_blocks
            if trace is not None:
                value = (decision.value[j] if halting is not None
                         else aggregate_margin(stats.logit_margin[j:j + 1], masked[j:j + 1], "mean")[0])
                trace[r].append(TraceStep(
                    step=int(nfe[r]) - 1, progress=float(prog[j]), margin=float(value),
                    threshold=float(decision.threshold[j]) if halting is not None else None,
                    committed=int(committed), masked_before=n_masked, halted=bool(halt[j]),
                    tokens=x[r, plen:].tolist(),
                ))

    return GenerationOutput(sequences=x, nfe=nfe, halt_step=halt_step, prompt_length=plen, trace=trace)
