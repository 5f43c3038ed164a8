"""Fused token statistics over logits: ``token_stats`` (Triton kernel, chunked torch reference, dispatch)."""

from .token_stats import TokenStats, token_stats

__all__ = ["TokenStats", "token_stats"]
