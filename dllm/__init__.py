"""Masked-diffusion LM decoding (LLaDA-style blocks, Dream-style shifted span) with pluggable halting."""

from .dream import dream_generate
from .generate import generate
from .halting import HaltDecision, HaltingRule, Prophet, SchED, aggregate_margin
from .output import GenerationOutput, TraceStep

__all__ = [
    "generate", "dream_generate", "SchED", "Prophet", "HaltingRule", "HaltDecision", "aggregate_margin",
    "GenerationOutput", "TraceStep",
]
