"""Halting and commits per block, for a block-causal model in :func:`diffexit.dllm.generate`.

In a block-causal model a block never reads a later one, and with the exact cache (:mod:`~diffexit.dllm.exact_cache`)
the statistics of later blocks are never computed. So on such a model a halting rule decides per block, with or
without the cache (the same decisions either way):

- it sees the token statistics and the masked positions of the sample's current block only (``[A, block_length]``);
- its step is the step within the block, out of the steps per block, so a progress-aware schedule restarts with
  each block;
- its per-sample state is per (sample, block): the rule is started for ``batch * num_blocks`` rows of
  ``block_length`` positions, and each block is a fresh row. SchED's patience compares the previous argmax, and
  without fresh rows the first step of a block would compare its argmax with the previous block's (for two
  all-EOS blocks, equal), carrying the stable count across blocks;
- a block that halts gets its masks filled with the current argmax, and the sample moves on to its next block.

A sample stops when its last block is done, or, given ``eos_token_ids``, once a block it committed is all
end-of-text: its remaining masks are then filled with the first of those ids (:func:`eos_stop`), as the trained
model would continue.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..kernels import TokenStats
from .halting import HaltDecision, HaltingRule, Prophet


def check_block_causal(layout: tuple[int, int], prompt_length: int, block_length: int, cache, halting) -> None:
    """``ValueError`` naming the fix when a decode does not fit the block-causal ``layout`` ``(prompt, block)``."""
    model_prompt, model_block = layout
    if block_length != model_block:
        raise ValueError(f"the model is block-causal with blocks of {model_block}; decode with "
                         f"block_length={model_block}, not {block_length}")
    if prompt_length != model_prompt:
        raise ValueError(f"the model is block-causal and its prompt block is {model_prompt} positions; pad the "
                         f"prompts to {model_prompt} (they are {prompt_length})")
    if cache == "dual":
        raise ValueError("cache='dual' keeps the K/V after the current block, and in a block-causal model nothing "
                         "attends to a later block: use cache='prefix', which is exact for it")
    if isinstance(halting, Prophet):
        raise ValueError("Prophet reads a fixed answer window of the whole span, and a block-causal model halts per "
                         "block, seeing the current block only: use SchED(...), which decides per block")


class BlockHalting:
    """A halting rule run per block: each (sample, block) pair is a fresh row of the rule's state.

    Args:
        rule: the rule (started here, for ``batch * num_blocks`` rows of ``block_length`` positions and
            ``steps_per_block`` steps).
        batch, num_blocks, block_length, steps_per_block: the decode's layout.
        device: where the rule keeps its state.
    """

    def __init__(self, rule: HaltingRule, batch: int, num_blocks: int, block_length: int, steps_per_block: int,
                 device):
        self.rule, self.num_blocks = rule, num_blocks
        rule.start(batch * num_blocks, block_length, device, steps_per_block)

    def decide(self, stats: TokenStats, masked: torch.Tensor, block_cols: torch.Tensor, block: torch.Tensor,
               block_step: torch.Tensor, rows: torch.Tensor) -> HaltDecision:
        """The rule's decision for the current blocks.

        Args:
            stats: the span's statistics, fields ``[A, L]``; only the current block's columns are shown the rule.
            masked: ``[A, L]`` bool, the span's masks.
            block_cols: ``[A, block_length]`` span positions of each sample's current block.
            block, block_step: ``[A]`` long, each sample's current block and its step within it.
            rows: ``[A]`` long, the samples' places in the batch.
        """
        shown = TokenStats(*(field.gather(1, block_cols) for field in stats))
        return self.rule.decide(shown, masked.gather(1, block_cols), block_step, rows * self.num_blocks + block)


def eos_stop(span: torch.Tensor, ended: torch.Tensor, ended_block: torch.Tensor, span_block: torch.Tensor,
             num_blocks: int, eos_token_ids: Sequence[int], mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples stop because the block they just ended is all end-of-text, and their spans with every
    remaining mask filled with ``eos_token_ids[0]``.

    Args:
        span: ``[A, L]`` token ids after this step's commits.
        ended: ``[A]`` bool, the sample's block ended at this step; ``ended_block``: ``[A]`` long, which block.
        span_block: ``[L]`` long, the block of each span position.
        num_blocks: blocks in the span (a last block that ends stops the sample anyway, so it is not counted).

    Returns:
        ``(stop [A] bool, span [A, L])``.
    """
    in_ended = span_block[None, :] == ended_block[:, None]
    is_eos = torch.isin(span, torch.as_tensor(list(eos_token_ids), dtype=span.dtype, device=span.device))
    stop = ended & (ended_block + 1 < num_blocks) & (is_eos | ~in_ended).all(-1)
    filled = torch.where(stop[:, None] & (span == mask_id), eos_token_ids[0], span)
    return stop, filled
