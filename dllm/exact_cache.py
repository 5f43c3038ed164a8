"""The exact prefix KV cache of a block-causal masked-diffusion model, for :func:`diffexit.dllm.generate`.

A block-causal model (the prompt is block 0, bidirectional in itself; each span block attends to the prompt, the
earlier blocks and itself, never to a later block) never changes the keys and values of the prompt or of a finished
block, so they are written once: the prompt's with block 0's first step, a block's with the first step of the next
one (the committed block runs once more, clean, beside the new all-mask block). Every other step runs the current
block's tokens alone against the cache, and the LM head runs over the current block only. The logits are those of
an uncached forward pass over the whole sequence, so decoding with the cache is decoding without it.

A model is block-causal when its ``config`` has an int ``block_length`` and ``prompt_length`` (the embedded
``DiffusionLlama`` family built with ``block_length=``). What it must support: ``forward(input_ids,
attention_mask=[B, C + N], position_ids=[1, N], cache=..., use_cache=True, logits_to_keep=K)`` with the cached
keys at positions ``0..C-1``, returning ``.logits`` of the last ``K`` positions and ``.cache`` (a transformers
``Cache``). A model whose ``config.pad_token_id`` is set leaves padding tokens unattended wherever they are (the
embedded model does): the cache's mask leaves them out of the cached keys too.
"""

from __future__ import annotations

from typing import Optional

import torch


def block_causal_layout(model) -> Optional[tuple[int, int]]:
    """``(prompt_length, block_length)`` of a block-causal model, None for any other."""
    config = getattr(model, "config", None)
    block = getattr(config, "block_length", None)
    return None if block is None else (int(config.prompt_length), int(block))


class ExactPrefixCache:
    """The written K/V of every sample (``[B, heads, P + L, head_dim]`` per layer) and the forward passes that use
    them. ``attention_mask``: ``[B, P + L]`` over prompt and span (1 = attended), or None."""

    def __init__(self, model, prompt_length: int, block_length: int, attention_mask: Optional[torch.Tensor]):
        self.model, self.plen, self.block_length = model, prompt_length, block_length
        self.attention_mask = attention_mask
        self.pad_token_id = getattr(model.config, "pad_token_id", None)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def step(self, x: torch.Tensor, rows: torch.Tensor, block: int, first: bool) -> torch.Tensor:
        """One step of ``block`` for samples ``rows`` (all at that block; ``first``: its first step). Logits
        ``[A, block_length, V]`` of the block's positions."""
        from transformers import DynamicCache

        start = self.plen + block * self.block_length
        end = start + self.block_length
        # The first step of a block also writes what became final since the last write: the prompt, or the block
        # just committed.
        begin = (0 if block == 0 else start - self.block_length) if first else start
        cache = DynamicCache(config=self.model.config)
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            cache.update(k[rows, :, :begin], v[rows, :, :begin], i)
        mask = (torch.ones(len(rows), end, dtype=torch.long, device=x.device) if self.attention_mask is None
                else self.attention_mask[rows, :end])
        if self.pad_token_id is not None:
            # The model never attends a padding token among the tokens it is given, and it is given the whole
            # sequence without a cache: a padding token the span committed must stay unattended once it is cached.
            mask = mask * (x[rows, :end] != self.pad_token_id)
        positions = torch.arange(begin, end, device=x.device).unsqueeze(0)
        out = self.model(x[rows, begin:end], attention_mask=mask, position_ids=positions, cache=cache,
                         use_cache=True, logits_to_keep=self.block_length)
        if begin < start:
            layers = out.cache.layers
            if not self.keys:
                for layer in layers:
                    shape = (x.shape[0], layer.keys.shape[1], x.shape[1], layer.keys.shape[-1])
                    self.keys.append(layer.keys.new_zeros(shape))
                    self.values.append(layer.values.new_zeros(shape))
            for kept_k, kept_v, layer in zip(self.keys, self.values, layers):
                kept_k[rows, :, begin:start] = layer.keys[:, :, begin:start]
                kept_v[rows, :, begin:start] = layer.values[:, :, begin:start]
        return out.logits
