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

:func:`record_full_steps` records that full-steps run pass by pass (:class:`Recording`): its answers feed the
halting oracle, and its per-pass argmax gives the commit oracle (:meth:`Recording.commit_oracle_nfe`), which commits
each token at the first pass after which its argmax never changes. The commit oracle is a reference point, not a
bound: committing a token early changes what the model sees at every later pass, which the recording cannot know.
For the same reason any span-halting rule can be evaluated on a recording without decoding
(:meth:`Recording.replay`), which makes searching over rules cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import TokenStats, token_stats
from .exact_cache import block_causal_layout
from .generate import generate
from .halting import HaltDecision, HaltingRule


@dataclass
class Recording:
    """A full-steps decode of ``B`` prompts, pass by pass (``T`` passes, span of ``L``).

    Attributes:
        final: ``[B, L]`` long, the generated span.
        stats: :class:`~diffexit.kernels.TokenStats` of every span position at each pass, fields ``[T, B, L]``
            (what a halting rule would have seen; ties to the lowest id).
        masked: ``[T, B, L]`` bool, the positions still masked when each pass ran.
        per_block: whether the model is block-causal (its loop halts per block, not the whole span).
    """

    final: torch.Tensor
    stats: TokenStats
    masked: torch.Tensor
    per_block: bool = False

    def commit_steps(self) -> torch.Tensor:
        """``[B, L]`` long: each position's first pass ``s`` such that its argmax equals its final token at every
        pass from ``s`` to the pass that committed it (the last pass it was masked at)."""
        right = (self.stats.top1_id == self.final[None]) | ~self.masked
        # Walking back from the last pass, a position stays "right since" a pass while every later masked pass is
        # right; a masked wrong pass resets it.
        passes = right.shape[0]
        since = torch.full(self.final.shape, passes, dtype=torch.long)
        run = torch.ones(self.final.shape, dtype=torch.bool)
        for t in range(passes - 1, -1, -1):
            run &= right[t]
            since = torch.where(run & self.masked[t], torch.full_like(since, t), since)
        return since

    def commit_oracle_nfe(self) -> torch.Tensor:
        """``[B]`` long: the passes of the commit oracle, which commits each token at its :meth:`commit_steps`
        pass and runs a pass only where it commits something: the number of distinct commit passes per sample."""
        steps = self.commit_steps()
        return torch.tensor([len(torch.unique(row)) for row in steps], dtype=torch.long)

    def replay(self, rule: HaltingRule) -> tuple[torch.Tensor, torch.Tensor]:
        """What decoding with span-halting ``rule`` would give, without decoding: until a rule fires the decode is
        the recorded one, and halting at pass ``t`` keeps the answer exactly when every masked argmax at ``t`` is
        the final token. Returns ``(nfe [B] long, kept [B] bool)``: each sample's passes and whether its answer is
        the full-steps one. Only for a bidirectional model (a block-causal one halts per block)."""
        if self.per_block:
            raise ValueError("replay follows whole-span halting; a block-causal model halts per block, so decode it "
                             "with generate(halting=rule) instead")
        passes, batch, span = self.masked.shape
        rule.start(batch, span, torch.device("cpu"), passes)
        nfe = torch.full((batch,), passes, dtype=torch.long)
        kept = torch.ones(batch, dtype=torch.bool)
        active = torch.arange(batch)
        for t in range(passes):
            stats = TokenStats(*(field[t, active] for field in self.stats))
            halt = rule.decide(stats, self.masked[t, active], torch.full((len(active),), t), active).halt.cpu()
            rows = active[halt]
            nfe[rows] = t + 1
            kept[rows] = ((self.stats.top1_id[t, rows] == self.final[rows]) | ~self.masked[t, rows]).all(-1)
            active = active[~halt]
            if len(active) == 0:
                break
        return nfe, kept


def record_full_steps(model, input_ids: torch.Tensor, **generate_kwargs) -> Recording:
    """Decode ``input_ids`` ``[B, P]`` greedily with full steps (``generate`` with ``generate_kwargs``) and record
    each pass's token statistics over the span; ``halting``, a cache, parallel commits, guidance, sampling and
    suppressed tokens are refused (the recording is of the plain decode those would change)."""
    for key in ("halting", "cache", "parallel_threshold", "cfg_scale", "temperature", "suppress_token_ids"):
        if generate_kwargs.get(key):  # each one's plain value (None, 0, ()) is falsy
            raise ValueError(f"record_full_steps records greedy plain full steps; drop {key}={generate_kwargs[key]!r}")
    span = generate_kwargs["gen_length"]
    stats, masked = [], []
    mask_id = generate_kwargs["mask_id"]

    def hook(_module, args, output):
        logits = output.logits if hasattr(output, "logits") else output
        if logits.shape[0] != input_ids.shape[0]:
            raise RuntimeError("record_full_steps saw a pass over part of the batch; full steps run every sample "
                               "at every pass")
        stats.append(TokenStats(*(field.cpu() for field in token_stats(logits[:, -span:]))))
        masked.append((args[0][:, -span:] == mask_id).cpu())

    handle = model.register_forward_hook(hook)
    try:
        out = generate(model, input_ids, **generate_kwargs)
    finally:
        handle.remove()
    return Recording(final=out.generated.cpu(), stats=TokenStats(*(torch.stack(f) for f in zip(*stats))),
                     masked=torch.stack(masked), per_block=block_causal_layout(model) is not None)


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
