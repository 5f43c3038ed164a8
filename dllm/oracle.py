"""The halting oracle: the fewest passes any span-halting rule can take and keep every full-steps answer.

A halting rule only chooses *when* to fill every remaining mask with the current argmax; until it fires, the decode
is the full-steps decode. So, given the full-steps answers ``final`` of the same prompts (recorded first, untimed),
the first step at which the masked positions' argmax already equals ``final`` is the earliest halt that keeps the
answer, and any earlier halt changes it. :class:`HaltingOracle` halts there::

    final = generate(model, ids, **kw).generated
    oracle = generate(model, ids, halting=HaltingOracle(final), **kw)   # oracle.generated == final

It is a bound for span-halting rules (SchED, Prophet, a learned halting rule), not for rules that commit tokens
one by one (parallel commits change the trajectory itself). On a block-causal model the loop halts per block
(:mod:`~diffexit.dllm.block_decoding`), and the oracle then halts each block at its first right step.
"""

from __future__ import annotations

import torch

from .halting import HaltDecision, HaltingRule


class HaltingOracle(HaltingRule):
    """Halt each sample (each block, on a block-causal model) once its masked argmax equals the full-steps answer.

    Args:
        final: ``[B, L]`` long, the full-steps decode's generated span of the same ``B`` prompts, in batch order.

    The decision's ``value`` is the share of the masked positions whose argmax is already right, against a
    threshold of 1.
    """

    def __init__(self, final: torch.Tensor):
        if not isinstance(final, torch.Tensor) or final.dim() != 2 or final.dtype != torch.long:
            raise ValueError(f"final must be the [B, L] long tensor of a full-steps decode's generated span, got "
                             f"{getattr(final, 'shape', final)!r}")
        self.final = final

    def __repr__(self):
        return f"HaltingOracle(final={tuple(self.final.shape)})"

    def start(self, batch_size, span_length, device, total_steps):
        super().start(batch_size, span_length, device, total_steps)
        final = self.final.to(device)
        if span_length != final.shape[1] and final.shape[1] % span_length == 0:
            # Per-block halting: row sample * num_blocks + block holds that block's positions.
            final = final.reshape(-1, span_length)
        if tuple(final.shape) != (batch_size, span_length):
            raise ValueError(f"the oracle's answers are {tuple(self.final.shape)}, but the decode has {batch_size} "
                             f"rows of {span_length} positions: record final with the same prompts and lengths")
        self._final = final

    def decide(self, stats, masked, step, rows):
        right = (stats.top1_id == self._final[rows]) & masked
        count = masked.sum(-1)
        halt = right.sum(-1) == count
        value = torch.where(count > 0, right.sum(-1).float() / count.clamp(min=1).float(), torch.ones_like(
            count, dtype=torch.float32))
        return HaltDecision(halt=halt, value=value, threshold=torch.ones_like(value))
