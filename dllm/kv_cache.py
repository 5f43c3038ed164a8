"""Fast-dLLM's block-wise approximate KV caches, for the LLaDA-style loop (:func:`diffexit.dllm.generate`).

- ``prefix``: at each block's first step the whole sequence runs, and the keys and values of everything before the
  block (the prompt and the finished blocks) are kept; the block's later steps run the block and everything after
  it against them.
- ``dual``: the K/V of the positions after the block are kept too, so the later steps run the block's tokens alone.

Approximate, as in Fast-dLLM: attention is bidirectional, so the kept K/V are those of the block's first step, when
the block was still all masks. ``refresh=r`` bounds how stale they get: every ``r``-th later step of a block runs the
whole sequence again, as its first step does, and keeps the new K/V (``r=1``: every step, which is decoding without
a cache; ``r`` at least the steps per block: Fast-dLLM's caches). A forward that runs only part of the span gives fresh logits for that part only; with
``dual`` the rest of the span keeps the statistics of the block's first step, which is what SchED and Prophet then
read there (:class:`~diffexit.dllm.decoding.LatestStats`).

What a model must support: ``forward(input_ids, attention_mask=..., position_ids=..., cache=...,
use_cache=True)`` (``past_key_values=`` is taken too) returning ``.logits`` and ``.cache`` (or ``.past_key_values``),
a transformers ``Cache`` whose ``layers[i].keys`` / ``.values`` are ``[B, heads, N, head_dim]``; bidirectional
attention over the cached keys and the new tokens under a 2-D mask of both. transformers' ``LlamaForCausalLM``
with ``is_causal=False`` does, and so does the embedded model. With a cache, padding must be marked in the
``attention_mask`` (the model never sees the cached tokens again).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

CACHES = ("prefix", "dual")


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
        refresh: rewrite the kept K/V with a whole-sequence pass at every ``refresh``-th later step of a block (an
            int >= 1), or None: only at a block's first step.
    """

    def __init__(self, kind: str, model, prompt_length: int, block_length: int,
                 attention_mask: Optional[torch.Tensor], refresh: Optional[int] = None):
        if refresh is not None and (isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 1):
            raise ValueError(f"refresh must be None (keep a block's first K/V) or a whole number of steps >= 1, got "
                             f"{refresh!r}")
        keyword = _cache_keyword(model)
        if keyword is None:
            raise ValueError(f"cache={kind!r} needs a model whose forward takes a transformers cache (`cache=` or "
                             f"`past_key_values=`, with `use_cache=True` and `position_ids=`); "
                             f"{type(model).__name__} does not: decode it with cache=None")
        self.kind, self.model, self.keyword = kind, model, keyword
        self.plen, self.block_length, self.attention_mask = prompt_length, block_length, attention_mask
        self.refresh = refresh
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.since: Optional[torch.Tensor] = None  # [B] long: later steps of each sample since its K/V were written

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
        self.since[rows] = 0
        return out.logits

    def window(self, block: int) -> tuple[int, int]:
        """The sequence positions a later step of ``block`` runs: ``(start, end)``."""
        start = self.plen + block * self.block_length
        return start, (start + self.block_length if self.kind == "dual" else None)

    def later(self, x: torch.Tensor, rows: torch.Tensor, block: int) -> torch.Tensor:
        """A later step of ``block`` for samples ``rows`` (all in that block): the window runs against the kept
        K/V, or for samples whose refresh is due the whole sequence runs and rewrites them. Logits ``[A, W, V]`` of
        the window's positions (:meth:`window`)."""
        if self.refresh is None:
            return self._window_pass(x, rows, block)
        self.since[rows] += 1
        due = self.since[rows] >= self.refresh
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
