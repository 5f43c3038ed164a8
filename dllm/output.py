"""What the decoding loops return: sequences, per-sample forward counts, and an optional per-step trace."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class TraceStep:
    """One forward pass of one sample.

    Attributes:
        step: 0-based forward-pass index of this sample.
        progress: decoding progress in ``[0, 1]`` that the halting rule saw (on a block-causal model, within the
            block).
        margin: the aggregated margin the rule compared (the rule's statistic; without a rule, the mean logit
            margin over the masked span), in logits.
        threshold: the rule's threshold at this progress, or None without a rule.
        committed: tokens committed at this step (on halt: every remaining mask).
        masked_before: masked positions in the span before this step.
        halted: the rule fired at this step (on a block-causal model: for the current block).
        tokens: the span after this step (token ids), for replaying how it unmasked.
        stopped: the sample stopped at this step because the block it committed is all end-of-text; its
            remaining masks were filled with EOS (counted in ``committed``).
    """

    step: int
    progress: float
    margin: float
    threshold: Optional[float]
    committed: int
    masked_before: int
    halted: bool
    tokens: list[int] = field(default_factory=list)
    stopped: bool = False


@dataclass
class GenerationOutput:
    """Result of :func:`diffexit.dllm.generate` / :func:`diffexit.dllm.dream_generate`.

    Attributes:
        sequences: ``[B, P + gen_length]`` int64, the prompt followed by the generated span.
        nfe: ``[B]`` int64, forward passes each sample took part in (a guided step counts once).
        halt_step: ``[B]`` int64, the forward-pass index at which the halting rule fired (last fired, on a
            block-causal model, where it decides per block), or -1.
        prompt_length: ``P``.
        trace: per sample, the list of its :class:`TraceStep`, when asked for.
    """

    sequences: torch.Tensor
    nfe: torch.Tensor
    halt_step: torch.Tensor
    prompt_length: int
    trace: Optional[list[list[TraceStep]]] = None

    @property
    def generated(self) -> torch.Tensor:
        """``[B, gen_length]``: the span without the prompt."""
        return self.sequences[:, self.prompt_length:]
