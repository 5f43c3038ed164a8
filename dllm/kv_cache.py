"""Fast-dLLM's block-wise approximate KV caches, for the LLaDA-style loop (:func:`diffexit.dllm.generate`).

- ``prefix``: at each block's first step the whole sequence runs, and the keys and values of everything before the
  block (the prompt and the finished blocks) are kept; the block's later steps run the block and everything after
  it against them.
- ``dual``: the K/V of the positions after the block are kept too, so the later steps run the block's tokens alone.

Approximate, as in Fast-dLLM: attention is bidirectional, so the kept K/V are those of the block's first step, when
the block was still all masks. A refresh policy (``generate(cache_refresh=...)``, :func:`check_refresh`) bounds how
stale they get: a later step of a block whose refresh is due runs the whole sequence again, as the block's first
step does, and keeps the new K/V. Per sample, it is due

- ``k`` (a whole number): at every ``k``-th later step of the block (``1``: every step, which is decoding without
  a cache; ``k`` at least the steps per block: Fast-dLLM's caches);
- ``"confidence:C"``: at the step after one that committed a token at probability at most ``C`` (a choice the
  kept K/V never saw; a token the all-mask pass already predicted confidently moves the other positions little).
  ``C=0`` never refreshes (an argmax is never that improbable): Fast-dLLM's caches; ``C=1`` refreshes after every
  step that commits a token, which is decoding without a cache when every step commits one (steps per block at
  most the block length).

A forward that runs only part of the span gives fresh logits for that part only; with ``dual`` the rest of the span
keeps the statistics of the block's last whole-sequence pass, which is what SchED and Prophet then read there
(:class:`~diffexit.dllm.decoding.LatestStats`).

What a model must support: ``forward(input_ids, attention_mask=..., position_ids=..., cache=...,
use_cache=True)`` (``past_key_values=`` is taken too) returning ``.logits`` and ``.cache`` (or ``.past_key_values``),
a transformers ``Cache`` whose ``layers[i].keys`` / ``.values`` are ``[B, heads, N, head_dim]``; bidirectional
attention over the cached keys and the new tokens under a 2-D mask of both. transformers' ``LlamaForCausalLM``
with ``is_causal=False`` does, and so does the embedded model. With a cache, padding must be marked in the
``attention_mask`` (the model never sees the cached tokens again).
"""

from __future__ import annotations

import inspect
import math
from typing import Optional, Union

import torch

CACHES = ("prefix", "dual")
CONFIDENCE = "confidence"
REFRESH_HELP = ("a whole number k (rewrite the kept K/V at every k-th later step of a block) or 'confidence:C' "
                "(at the step after one that committed a token at probability <= C, C in [0, 1])")


def check_refresh(value) -> Union[None, int, str]:
    """The refresh policy ``value`` normalised: None, a whole number ``k >= 1``, or ``"confidence:C"`` with ``C``
    a float's repr; a string of digits is a ``k``. ``ValueError`` naming the valid forms otherwise."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= 1:
            return value
    elif isinstance(value, str) and value.startswith(f"{CONFIDENCE}:"):
        try:
            level = float(value[len(CONFIDENCE) + 1:])
        except ValueError:
            level = math.nan
        if 0.0 <= level <= 1.0:
            return f"{CONFIDENCE}:{level!r}"
    raise ValueError(f"cache_refresh must be None (keep a block's first K/V), {REFRESH_HELP}; got {value!r}")


def _cache_keyword(model) -> Optional[str]:
    forward = getattr(model, "forward", None)
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in ("cache", "past_key_values") if name in params), None)


class BlockCache:
    """The kept K/V of every sample, and the forward passes that use them.

    Args:
        kind: ``"prefix"`` or ``"dual"``.
        model: see the module docstring.
        prompt_length, block_length: the sequence layout.
        attention_mask: ``[B, N]`` over prompt and span (1 = attended), or None (everything attended).
        refresh: when a later step rewrites the kept K/V with a whole-sequence pass (:func:`check_refresh`'s
            forms; the module docstring), or None: only at a block's first step. With ``"confidence:C"`` the loop
            reports each step's commits (:meth:`committed`).
    """

    def __init__(self, kind: str, model, prompt_length: int, block_length: int,
                 attention_mask: Optional[torch.Tensor], refresh: Union[None, int, str] = None):
        refresh = check_refresh(refresh)
        keyword = _cache_keyword(model)
        if keyword is None:
            raise ValueError(f"cache={kind!r} needs a model whose forward takes a transformers cache (`cache=` or "
                             f"`past_key_values=`, with `use_cache=True` and `position_ids=`); "
                             f"{type(model).__name__} does not: decode it with cache=None")
        self.kind, self.model, self.keyword = kind, model, keyword
        self.plen, self.block_length, self.attention_mask = prompt_length, block_length, attention_mask
        # Exactly one of the two is set with a refresh policy: the period k, or the confidence level C.
        self.every = refresh if isinstance(refresh, int) else None
        self.level = float(refresh.split(":")[1]) if isinstance(refresh, str) else None
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.since: Optional[torch.Tensor] = None  # [B] long: later steps of each sample since its K/V were written
        self.drifted: Optional[torch.Tensor] = None  # [B] bool: a token at probability <= C committed since then

    def _mask(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.attention_mask is None:
            return torch.ones(len(rows), x.shape[1], dtype=torch.long, device=x.device)
        return self.attention_mask[rows]

    def full(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """A block's first step for samples ``rows``: every position runs, and the K/V are kept. Logits
        ``[A, N, V]``, exactly those of the uncached forward (no ``position_ids`` either, as the reference)."""
        mask = None if self.attention_mask is None else self.attention_mask[rows]
        out = self.model(x[rows], attention_mask=mask, use_cache=True)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        layers = getattr(cache, "layers", None)
        if not layers or getattr(layers[0], "keys", None) is None or layers[0].keys.shape[-2] != x.shape[1]:
            raise ValueError(f"{type(self.model).__name__} returned no key/value cache of the whole sequence with "
                             f"use_cache=True; cache= needs one (see diffexit.dllm.kv_cache), so decode with "
                             f"cache=None")
        if not self.keys:
            for layer in layers:
                shape = (x.shape[0], *layer.keys.shape[1:])
                self.keys.append(layer.keys.new_zeros(shape))
                self.values.append(layer.values.new_zeros(shape))
        for kept_k, kept_v, layer in zip(self.keys, self.values, layers):
            kept_k[rows] = layer.keys
            kept_v[rows] = layer.values
        if self.since is None:
            self.since = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            self.drifted = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        self.since[rows] = 0
        self.drifted[rows] = False
        return out.logits

    def committed(self, rows: torch.Tensor, fill: torch.Tensor, confidence: torch.Tensor) -> None:
        """Note a step's commits for the confidence policy (a no-op for the others): ``fill`` ``[A, L]`` bool, the
        span positions samples ``rows`` committed; ``confidence`` ``[A, L]`` float, each one's probability."""
        if self.level is not None:
            self.drifted[rows] |= (fill & (confidence <= self.level)).any(-1)

    def window(self, block: int) -> tuple[int, int]:
        """The sequence positions a later step of ``block`` runs: ``(start, end)``."""
        start = self.plen + block * self.block_length
        return start, (start + self.block_length if self.kind == "dual" else None)

    def later(self, x: torch.Tensor, rows: torch.Tensor, block: int) -> torch.Tensor:
        """A later step of ``block`` for samples ``rows`` (all in that block): the window runs against the kept
        K/V, or for samples whose refresh is due the whole sequence runs and rewrites them. Logits ``[A, W, V]`` of
        the window's positions (:meth:`window`)."""
        if self.every is None and self.level is None:
            return self._window_pass(x, rows, block)
        self.since[rows] += 1
        due = self.since[rows] >= self.every if self.every is not None else self.drifted[rows]
        start, end = self.window(block)
        if due.all():
            return self.full(x, rows)[:, start:end]
        if not due.any():
            return self._window_pass(x, rows, block)
        kept = self._window_pass(x, rows[~due], block)
        logits = kept.new_empty((len(rows), *kept.shape[1:]))
        logits[~due] = kept
        logits[due] = self.full(x, rows[due])[:, start:end]
        return logits

    def _window_pass(self, x: torch.Tensor, rows: torch.Tensor, block: int) -> torch.Tensor:
        from transformers import DynamicCache

        start, end = self.window(block)
        end = x.shape[1] if end is None else end
        config = getattr(self.model, "config", None)
        cache = DynamicCache(config=config) if config is not None else DynamicCache()
        mask = self._mask(x, rows)
        if self.kind == "dual":
            mask = torch.cat([mask[:, :start], mask[:, end:], mask[:, start:end]], dim=1)
        for i, (kept_k, kept_v) in enumerate(zip(self.keys, self.values)):
            k, v = kept_k[rows], kept_v[rows]
            if self.kind == "dual":
                k = torch.cat([k[:, :, :start], k[:, :, end:]], dim=2)
                v = torch.cat([v[:, :, :start], v[:, :, end:]], dim=2)
            else:
                k, v = k[:, :, :start], v[:, :, :start]
            cache.update(k, v, i)
        positions = torch.arange(start, end, device=x.device).unsqueeze(0)
        out = self.model(x[rows, start:end], attention_mask=mask, position_ids=positions,
                         **{self.keyword: cache}, use_cache=True)
        return out.logits
