"""Masked-diffusion LM decoding (LLaDA-style blocks, Dream-style shifted span) with pluggable halting.

- ``generate`` (LLaDA's loop) and ``dream_generate`` (Dream's), with their shared pieces in ``decoding``.
- Halting rules (``halting``): ``SchED``, ``Prophet``; ``rule_spec`` builds them from user parameters.
- ``calibrate``: SchED thresholds with a conformal bound on answer-changing halts.
- ``MaskedDiffusionPipeline`` (``pipeline``): a diffusers pipeline around either loop.

The embedded character-level model and its tasks live apart, in ``diffexit.dllm.charlm``.
"""

from .dream import dream_generate
from .generate import generate
from .halting import HaltDecision, HaltingRule, Prophet, SchED, aggregate_margin
from .output import GenerationOutput, TraceStep

__all__ = [
    "generate", "dream_generate", "SchED", "Prophet", "HaltingRule", "HaltDecision", "aggregate_margin",
    "GenerationOutput", "TraceStep",
]
