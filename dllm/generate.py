"""LLaDA-style masked-diffusion decoding, with optional halting, parallel commits and KV caches.

The loop, top to bottom; every step treats all samples still decoding as one batch:

1. run the model on prompt + span (with classifier-free guidance if asked); with a KV cache, a block's later
   steps run only the part that changes (:mod:`diffexit.dllm.kv_cache`);
2. ``token_stats`` of the span logits: argmax, its probability, the top-1 minus top-2 margin;
3. the halting rule (if any) decides per sample; a sample that halts gets every remaining mask, in every block,
   filled with the current argmax, and leaves the batch. On a block-causal model it decides per block instead
   (:mod:`diffexit.dllm.block_decoding`): a block that halts gets its own masks filled, and the sample goes on
   with its next block, unless that block is all end-of-text (``eos_token_ids``), which ends the sample;
4. the others commit the most confident masked tokens of their current block: the scheduled number (steps split
   evenly, remainder to the earliest steps), or with ``parallel_threshold`` also every token at least that probable;
5. a sample moves to its next block when this one's steps are spent (or, with parallel commits, its masks), and
   leaves the batch after its last.

The bookkeeping is a few batched tensor ops per step on the logits' device, whatever the batch size.

With ``halting=None``, no ``parallel_threshold``, no cache and no suppressed tokens, greedy ``low_confidence``
decoding is token for token LLaDA's reference ``generate.py`` as of commit d5634da (ML-GSAI/LLaDA, May 2025),
which ranks confidences in float64. Since f51cb17 ("Remove float64 in softmax") the reference ranks in the model's
dtype; the two differ only where float32 probabilities tie exactly (margins above about 17 nats), where float64
still tells the positions apart.

Parallel commits take the larger of the scheduled count and the count above the threshold, so a block never
needs more than its scheduled steps. Fast-dLLM commits at least one token with no step cap; the two agree
when ``steps == gen_length``. Like the reference, an uncached forward passes no ``position_ids``: a model whose
positions should skip left padding must compute them from the attention mask (the embedded model pads prompts to
a fixed length and uses absolute positions).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..common.schedules import progress
from .decoding import (
    LatestStats,
    add_gumbel_noise,
    call_model,
    check_finite_nonnegative,
    check_inputs,
    record_trace,
    span_stats,
    suppress,
    topk_commit,
)
from .block_decoding import BlockHalting, check_block_causal, eos_stop
from .commit_rule import CommitRule, eos_tail
from .halting import HaltingRule, aggregate_margin
from .exact_cache import ExactPrefixCache, block_causal_layout
from .kv_cache import CACHES, BlockCache, check_refresh
from .output import GenerationOutput

REMASKING = ("low_confidence", "random")


def num_transfer_tokens(masked_count: int, steps: int) -> list[int]:
    """How many tokens each of ``steps`` steps commits: an even split, the remainder to the earliest steps."""
    base, rem = divmod(masked_count, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def check_blocks(gen_length: int, steps: int, block_length: int) -> int:
    """The number of blocks; ``ValueError`` naming the valid block lengths or step counts when they do not fit."""
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


def _check_cache(cache, num_blocks: int, cfg_scale: float, refresh, block_causal: bool, remasking: str) -> None:
    if refresh is not None:
        if cache is None:
            raise ValueError(f"cache_refresh={refresh!r} refreshes the kept K/V of an approximate cache, and there is "
                             f"no cache: give cache='prefix' or 'dual', or drop cache_refresh")
        if block_causal:
            raise ValueError("cache_refresh refreshes the approximate cache of a bidirectional model; on this "
                             "block-causal model cache='prefix' is exact and never stale: drop cache_refresh")
        if isinstance(refresh, str) and remasking == "random":
            raise ValueError(f"cache_refresh={refresh!r} reads the committed tokens' probabilities, and "
                             f"remasking='random' commits by a uniform draw: use remasking='low_confidence' or a "
                             f"whole number of steps")
    if cache is None:
        return
    if cache not in CACHES:
        raise ValueError(f"cache must be None or one of {CACHES}, got {cache!r}")
    if cache == "dual" and num_blocks == 1:
        raise ValueError("cache='dual' keeps the K/V after the current block, and with one block (block_length == "
                         "gen_length) there is nothing after it, so it cannot help; use cache='prefix', which keeps "
                         "the prompt's, or a block_length below gen_length")
    if cfg_scale > 0:
        raise ValueError("a KV cache with classifier-free guidance is not supported: decode with cache=None, or "
                         "cfg_scale=0")


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
    cache: Optional[str] = None,
    cache_refresh=None,
    eos_token_ids: Sequence[int] = (),
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
            every step. On a block-causal model it decides per block (:mod:`diffexit.dllm.block_decoding`). A
            :class:`~diffexit.dllm.commit_rule.CommitRule` in ``commit`` mode also commits every masked token of the
            current block it clears, a block ends once its masks do, and a sample ends with a block after which
            every mask is in an end-of-text tail that clears (filled).
        attention_mask: ``[B, P]`` 1 for real prompt tokens, 0 for padding; the span is always attended.
        cfg_scale: classifier-free guidance; the unconditional copy has its prompt masked.
        parallel_threshold: Fast-dLLM-style parallel commits: also commit every masked token of the current
            block whose probability is at least this, so blocks can finish in fewer steps.
        suppress_token_ids: token ids whose logits are set to ``-inf`` (e.g. EOS / EoT) before anything else.
        cache: None, ``"prefix"`` or ``"dual"``: Fast-dLLM's block-wise approximate KV caches (what the model
            must support: :mod:`diffexit.dllm.kv_cache`). On a block-causal model ``"prefix"`` is the exact cache
            (:mod:`diffexit.dllm.exact_cache`): the same tokens as ``cache=None``.
        cache_refresh: when an approximate cache's kept K/V are rewritten by a whole-sequence pass: None (at a
            block's first step only: Fast-dLLM's), a whole number ``k`` (every ``k``-th later step of a block) or
            ``"confidence:C"`` (the step after one that committed a token at probability ``<= C``); see
            :mod:`diffexit.dllm.kv_cache`. Refused without a cache and on a block-causal model.
        eos_token_ids: end-of-text ids (EOS, padding). With ``halting`` on a block-causal model, a sample whose
            committed block is all of these stops, its remaining masks filled with the first; unused otherwise
            (a bidirectional model's later blocks still move the earlier ones' logits).
        generator: RNG for temperature sampling and random remasking.
        return_trace: record a :class:`~diffexit.dllm.output.TraceStep` per sample per forward pass.

    Returns:
        :class:`GenerationOutput` with ``sequences`` ``[B, P + gen_length]`` and ``nfe`` ``[B]``.
    """
    check_inputs(model, input_ids, attention_mask, gen_length=gen_length, steps=steps, mask_id=mask_id,
                 temperature=temperature)
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    check_finite_nonnegative("cfg_scale", cfg_scale, "0: no guidance")
    if halting is not None and not isinstance(halting, HaltingRule):
        raise ValueError(f"halting must be a HaltingRule such as SchED(...) or Prophet(), or None, got "
                         f"{halting!r}; to name a rule by string, use DecodeSpec(method=..., params=...)")
    if parallel_threshold is not None and not 0.0 < parallel_threshold <= 1.0:
        raise ValueError(f"parallel_threshold must be a probability in (0, 1], got {parallel_threshold}")
    if parallel_threshold is not None and remasking == "random":
        raise ValueError("parallel_threshold compares token probabilities; it needs remasking='low_confidence'")
    block_length = gen_length if block_length is None else block_length
    num_blocks = check_blocks(gen_length, steps, block_length)
    cache_refresh = check_refresh(cache_refresh)
    layout = block_causal_layout(model)
    _check_cache(cache, num_blocks, cfg_scale, cache_refresh, layout is not None, remasking)
    if layout is not None:
        check_block_causal(layout, input_ids.shape[1], block_length, cache, halting)
    if isinstance(halting, CommitRule):
        halting.bind(model, block_length)
    commits = isinstance(halting, CommitRule) and halting.commits
    eos_token_ids = tuple(eos_token_ids)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 and i != mask_id for i in eos_token_ids):
        raise ValueError(f"eos_token_ids must be token ids (ints >= 0, not the mask id {mask_id}), got "
                         f"{list(eos_token_ids)}; pass e.g. [tokenizer.eos_token_id]")
    steps_per_block = steps // num_blocks

    batch, plen = input_ids.shape
    device = input_ids.device
    x = torch.full((batch, plen + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :plen] = input_ids
    if attention_mask is not None:
        attention_mask = torch.cat(
            [attention_mask, torch.ones(batch, gen_length, dtype=attention_mask.dtype, device=device)], dim=1)
    if cache is None:
        kv = None
    elif layout is not None:
        kv = ExactPrefixCache(model, plen, block_length, attention_mask)
    else:
        kv = BlockCache(cache, model, plen, block_length, attention_mask, refresh=cache_refresh)

    # Every span position starts masked and positions after the current block are never committed, so each
    # block starts with `block_length` masks and the per-step counts are the same for all blocks.
    schedule = torch.tensor(num_transfer_tokens(block_length, steps_per_block), device=device)
    span_block = torch.arange(gen_length, device=device) // block_length  # the block of each span position
    block = torch.zeros(batch, dtype=torch.long, device=device)  # current block of each sample
    block_step = torch.zeros(batch, dtype=torch.long, device=device)  # step within that block
    nfe = torch.zeros(batch, dtype=torch.long, device=device)
    halt_step = torch.full((batch,), -1, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    latest = LatestStats(batch, gen_length, device)
    trace = [[] for _ in range(batch)] if return_trace else None
    # On a block-causal model the rule decides per block (it cannot see later blocks through the exact cache, so
    # it never does, and cached decoding stays uncached decoding).
    per_block = BlockHalting(halting, batch, num_blocks, block_length, steps_per_block, device) \
        if halting is not None and layout is not None else None
    if halting is not None and per_block is None:
        halting.start(batch, gen_length, device, steps)
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64, device=device)

    while True:
        rows = (~done).nonzero().flatten()
        if len(rows) == 0:
            break
        nfe[rows] += 1
        # x0 and its probability are only needed where this step may commit: the current block.
        block_cols = block[rows, None] * block_length + torch.arange(block_length, device=device)
        x0_block, conf_block = _forward(model, x, attention_mask, rows, plen, block, block_step, block_cols, nfe, kv,
                                        cfg_scale, suppress_token_ids, temperature, generator, latest, mask_id,
                                        random=remasking == "random")
        stats = latest.of(rows)
        span = x[rows, plen:]
        masked = span == mask_id
        x0 = span.scatter(1, block_cols, x0_block)
        step_in_block = block_step[rows]
        step = block[rows] * steps_per_block + step_in_block  # nominal: parallel commits move it on too

        if per_block is not None:
            decision = per_block.decide(stats, masked, block_cols, block[rows], step_in_block, rows)
            halt = decision.halt.to(device)
        elif halting is not None:
            decision = halting.decide(stats, masked, step, rows)
            halt = decision.halt.to(device)
        else:
            halt = torch.zeros(len(rows), dtype=torch.bool, device=device)

        # Commit the most confident masks of each sample's current block.
        in_block = (span_block[None, :] == block[rows, None]) & masked
        conf = torch.zeros(span.shape, dtype=torch.float64, device=device).scatter(1, block_cols, conf_block)
        full_conf = torch.full((len(rows), plen + gen_length), float("-inf"), dtype=torch.float64, device=device)
        full_conf[:, plen:] = torch.where(in_block, conf, neg_inf)
        available = in_block.sum(-1)
        k = torch.minimum(schedule[step_in_block], available)
        pick = topk_commit(full_conf, torch.where(halt, 0, k))[:, plen:]
        if parallel_threshold is not None:
            pick |= (full_conf[:, plen:] >= parallel_threshold) & ~halt[:, None]
        if commits:
            cleared = halting.clear if per_block is None else torch.zeros_like(masked).scatter(1, block_cols,
                                                                                               halting.clear)
            # Commits stay in the current block, and the scheduled ones still go to the most confident masks:
            # committing a later block's choice early, or this block's choice before the tokens full steps commit
            # first, changed answers of the coupled tasks.
            pick |= cleared & in_block & ~halt[:, None]
        # A halted sample takes this step's argmax at every remaining mask, in all blocks (per block: in its
        # current block): no extra pass.
        fill = pick | ((in_block if per_block is not None else masked) & halt[:, None])
        fill_with = torch.where(halt[:, None], stats.top1_id, x0)
        new_span = torch.where(fill, fill_with, span)
        committed = fill.sum(-1)
        if isinstance(kv, BlockCache):
            kv.committed(rows, fill, conf)

        # Only parallel commits (and halting per block) end a block early: the reference runs every scheduled step,
        # even ones that commit nothing (steps_per_block > block_length).
        next_step = step_in_block + 1
        finished = next_step == steps_per_block
        if parallel_threshold is not None:
            finished |= committed == available
        if commits:
            finished |= ~(in_block & ~fill).any(-1)
            # A block that ends with every later mask in a clearing end-of-text tail ends the sample: its answer
            # blocks were decoded as full steps decode them, with the tail still masked (filling it earlier
            # changed the coupled tasks' choices). A block-causal model never sees later blocks: eos_stop instead.
            rest = masked & (span_block[None, :] > block[rows, None])
            tail = eos_tail(span, stats.top1_id, cleared, mask_id, halting.eos_token_ids) & rest
            ends = finished & ~halt & rest.any(-1) & ~(rest & ~tail).any(-1)
            new_span = torch.where(ends[:, None] & tail, stats.top1_id, new_span)
            committed = committed + (ends[:, None] & tail).sum(-1)
        stop = torch.zeros_like(halt)
        if per_block is not None:
            finished |= halt
            if eos_token_ids:
                # An all-EOS block ends the sample: the EOS it fills count as committed at this step.
                before = (new_span == mask_id).sum(-1)
                stop, new_span = eos_stop(new_span, finished, block[rows], span_block, num_blocks, eos_token_ids,
                                          mask_id)
                committed = committed + before - (new_span == mask_id).sum(-1)
        x[rows, plen:] = new_span
        if commits:
            # A filled end-of-text tail can finish later blocks too: go on with the first block that has a mask.
            has_mask = (new_span == mask_id).view(len(rows), num_blocks, block_length).any(-1)
            first = torch.where(has_mask.any(-1), has_mask.long().argmax(-1), num_blocks)
            block[rows] = torch.where(finished, torch.maximum(first, block[rows] + 1), block[rows])
        else:
            block[rows] = block[rows] + finished.long()
        block_step[rows] = torch.where(finished, 0, next_step)
        done[rows] = (halt if per_block is None else stop) | (block[rows] == num_blocks)
        halt_step[rows] = torch.where(halt, nfe[rows] - 1, halt_step[rows])

        if trace is not None:
            value = (decision.value if halting is not None
                     else aggregate_margin(stats.logit_margin, masked, "mean"))
            shown = progress(step_in_block, steps_per_block) if per_block is not None else progress(step, steps)
            record_trace(trace, rows, nfe[rows] - 1, shown, value, decision.threshold if halting is not None else None,
                         committed, masked.sum(-1), halt, x[rows, plen:], stopped=stop)

    return GenerationOutput(sequences=x, nfe=nfe.cpu(), halt_step=halt_step.cpu(), prompt_length=plen, trace=trace)


def _groups(rows: torch.Tensor, block: torch.Tensor, block_step: torch.Tensor):
    """The active samples split by (block, first step of it): each group runs one cached forward pass."""
    keys = block[rows] * 2 + (block_step[rows] == 0).long()
    for key in torch.unique(keys).tolist():
        yield rows[keys == key], key // 2, bool(key % 2)


def _forward(model, x, attention_mask, rows, plen, block, block_step, block_cols, nfe, kv, cfg_scale,
             suppress_token_ids, temperature, generator, latest, mask_id, random):
    """One forward pass for the samples ``rows``; refreshes ``latest`` where it covered the span.

    Returns ``(x0, confidence)`` at the current block's positions ``block_cols`` ``[A, block]``: the argmax (or
    Gumbel sample) and its float64 probability (or, with ``random``, a uniform draw).
    """
    if kv is None:
        groups, order = [(rows, None, True)], None
    else:
        groups = list(_groups(rows, block, block_step))
        order = torch.cat([g[0] for g in groups])
    x0s, confs = [], []
    for members, blk, first in groups:
        if kv is None:
            logits, start = _uncached(model, x, attention_mask, members, plen, cfg_scale, mask_id), 0
        elif isinstance(kv, ExactPrefixCache):
            logits, start = kv.step(x, members, blk, first), blk * kv.block_length
        elif first:
            logits, start = kv.full(x, members)[:, plen:], 0
        else:
            logits, start = kv.later(x, members, blk), kv.window(blk)[0] - plen
        logits = suppress(logits, suppress_token_ids)
        stats = span_stats(logits, nfe[members] - 1, members, mask_id)
        latest.update(members, start, stats)
        cols = block_cols[(members[:, None] == rows[None, :]).nonzero()[:, 1]] if kv is not None else block_cols
        in_block = logits.gather(1, (cols - start)[..., None].expand(-1, -1, logits.shape[-1]))
        if temperature > 0:
            x0 = add_gumbel_noise(in_block, temperature, generator).argmax(-1)
        else:
            x0 = stats.top1_id.gather(1, cols - start)
        if random:
            conf = torch.rand(x0.shape, device=x.device, generator=generator).double()
        else:
            # The reference's softmax is float64: in float32 every margin above ~17 nats rounds the probability to
            # 1.0 and confident positions would tie.
            conf = torch.softmax(in_block.double(), -1).gather(-1, x0[..., None]).squeeze(-1)
        x0s.append(x0)
        confs.append(conf)
    if order is None:
        return x0s[0], confs[0]
    # Back into the order of `rows`.
    back = torch.argsort((order[:, None] == rows[None, :]).nonzero()[:, 1])
    return torch.cat(x0s)[back], torch.cat(confs)[back]


def _uncached(model, x, attention_mask, rows, plen, cfg_scale, mask_id):
    """Span logits ``[A, L, V]`` of the whole sequence of samples ``rows``, guided when ``cfg_scale > 0``."""
    xa = x[rows]
    am = attention_mask[rows] if attention_mask is not None else None
    if cfg_scale > 0:
        uncond = xa.clone()
        uncond[:, :plen] = mask_id
        both = call_model(model, torch.cat([xa, uncond]), None if am is None else torch.cat([am, am]))
        cond, unc = both.chunk(2)
        logits = unc + (cfg_scale + 1) * (cond - unc)
    else:
        logits = call_model(model, xa, am)
    return logits[:, plen:]
