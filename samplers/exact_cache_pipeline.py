"""diffusers' ``LLaDA2Pipeline`` with the exact KV cache of a block-causal model, as a drop-in subclass.

    pipe = ExactCacheLLaDA2Pipeline(model=model, scheduler=scheduler, tokenizer=tok)
    out = pipe(input_ids=ids, attention_mask=mask, gen_length=16, block_length=4, num_inference_steps=4)

The stock pipeline runs the whole window (prompt, finished blocks, current block) at every step. In a block-causal
model (:mod:`diffexit.dllm.exact_cache`: the prompt is block 0, and no position attends to a later block) the keys
and values of everything before the current block never change, so this pipeline writes them once and runs each
step over the current block alone: the first step of a block also runs the block just finished (its K/V become
final), the others run the block's own tokens against the kept K/V, and the LM head runs over the block only. The
pipeline's loop, its scheduler (``SchEDScheduler`` too), editing, EOS stopping and callbacks are the stock ones; only
the model's forward passes are cut down, by a pre-hook and a hook on the model installed for the call. The logits
are those of the stock window, so the tokens are the stock pipeline's.

Kept tokens are checked at every step: a callback that rewrites a token whose K/V are kept makes the step run the
whole window again, so the result stays the stock one.

The model must be block-causal with the layout the pipeline's blocks follow: ``config.block_length`` equal to the
call's ``block_length``, prompts of ``config.prompt_length`` tokens (pad them; the embedded ``charlm-block``: 24),
and ``prompt_length`` a multiple of ``block_length``, so that every window ends where a model block ends. It must
take what :class:`~diffexit.dllm.exact_cache.ExactPrefixCache` passes (``cache=``, ``use_cache=True``,
``logits_to_keep=``). A bidirectional model is refused: every step changes the K/V of all positions it attends to,
so no cache of them is exact (:func:`diffexit.dllm.generate`'s ``cache="prefix"`` is Fast-dLLM's approximate one).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from diffusers import LLaDA2Pipeline

from ..dllm.exact_cache import block_causal_layout


class ExactCacheLLaDA2Pipeline(LLaDA2Pipeline):
    """``LLaDA2Pipeline`` whose forward passes reuse the exact K/V of the prompt and the finished blocks; the
    same components and call arguments as the stock pipeline (see the module docstring for the model it needs)."""

    def __init__(self, model, scheduler, tokenizer=None):
        layout = block_causal_layout(model)
        if layout is None:
            raise ValueError(f"ExactCacheLLaDA2Pipeline needs a block-causal model (config.block_length and "
                             f"prompt_length set, e.g. charlm-block); {type(model).__name__} is bidirectional, so "
                             f"every step changes the K/V of the window and no cache of them is exact: use the "
                             f"stock LLaDA2Pipeline, or diffexit.dllm.generate(cache='prefix') for Fast-dLLM's "
                             f"approximate cache")
        prompt_length, block_length = layout
        if prompt_length % block_length:
            raise ValueError(f"the model's prompt block is {prompt_length} positions, not a multiple of its blocks of "
                             f"{block_length}, so LLaDA2Pipeline's windows (whole blocks from position 0) end inside "
                             f"a model block and their K/V change later: use the stock LLaDA2Pipeline")
        super().__init__(model=model, scheduler=scheduler, tokenizer=tokenizer)

    def _prepare_input_ids(self, **kwargs) -> tuple[torch.LongTensor, torch.LongTensor]:
        ids, mask = super()._prepare_input_ids(**kwargs)
        prompt_length = block_causal_layout(self.model)[0]
        if ids.shape[-1] != prompt_length:
            raise ValueError(f"the model is block-causal and its prompt block is {prompt_length} positions; pad the "
                             f"prompts to {prompt_length} (they are {ids.shape[-1]}), e.g. with "
                             f"diffexit.dllm.charlm.tokenizer.encode_prompts, and pass input_ids= and attention_mask=")
        return ids, mask

    def __call__(self, *args, **kwargs):
        """As ``LLaDA2Pipeline.__call__``; ``block_length`` (or the scheduler's) must be the model's."""
        bound = inspect.signature(LLaDA2Pipeline.__call__).bind(self, *args, **kwargs)
        block_length = bound.arguments.get("block_length") or self.scheduler.config.block_length
        model_block = block_causal_layout(self.model)[1]
        if block_length != model_block:
            raise ValueError(f"the model is block-causal with blocks of {model_block}; call the pipeline with "
                             f"block_length={model_block} (or a scheduler configured so), not {block_length}")
        cache = WindowCache(self.model, model_block)
        hooks = [self.model.register_forward_pre_hook(cache.before, with_kwargs=True),
                 self.model.register_forward_hook(cache.after, with_kwargs=True)]
        try:
            return super().__call__(*args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()


class WindowCache:
    """The kept K/V (``[B, heads, C, head_dim]`` per layer) of the first ``C`` window positions, and the hooks that
    turn the stock pipeline's window pass ``model(ids [B, W], attention_mask=[B, W], position_ids=[B, W])`` into a
    pass over positions ``C..W-1`` whose logits are the last ``block_length`` positions' (the current block).

    Positions before the current block (``W - block_length``) are final; a pass that covers some not yet kept
    writes them after it runs."""

    def __init__(self, model, block_length: int):
        self.model, self.block_length = model, block_length
        self.pad_token_id = getattr(model.config, "pad_token_id", None)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.tokens: Optional[torch.Tensor] = None  # [B, C]: the tokens whose K/V are kept
        self._pending: Optional[tuple[int, int, torch.Tensor]] = None

    def _kept(self, ids: torch.Tensor) -> int:
        """How many leading positions of the window ``ids`` the kept K/V serve (0 drops them)."""
        if self.tokens is None:
            return 0
        kept = self.tokens.shape[1]
        if kept > ids.shape[1] - self.block_length or not torch.equal(self.tokens, ids[:, :kept]):
            self.keys, self.values, self.tokens = [], [], None
            return 0
        return kept

    def before(self, module, args, kwargs):
        from transformers import DynamicCache

        ids = args[0] if args else kwargs.pop("input_ids")
        mask, positions = kwargs.pop("attention_mask"), kwargs.pop("position_ids")
        kept = self._kept(ids)
        final = ids.shape[1] - self.block_length
        attended = mask.bool()
        if self.pad_token_id is not None:
            # The model never attends a padding token among those it is given, and the stock pass is given them
            # all: one that became a kept key must stay unattended.
            attended &= ids != self.pad_token_id
        cache = DynamicCache(config=self.model.config)
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            cache.update(k, v, i)
        # A copy: the pipeline writes its window in place, and a callback may rewrite a kept token there.
        self._pending = (kept, final, ids[:, :final].clone() if final > kept else None)
        kwargs.update(attention_mask=attended.long(), position_ids=positions[:, kept:], cache=cache, use_cache=True,
                      logits_to_keep=self.block_length)
        return (ids[:, kept:],), kwargs

    def after(self, module, args, kwargs, output):
        kept, final, tokens = self._pending
        if final > kept:
            layers = output.cache.layers
            if not self.keys:
                self.keys, self.values = [None] * len(layers), [None] * len(layers)
            for i, layer in enumerate(layers):
                k, v = layer.keys[:, :, kept:final], layer.values[:, :, kept:final]
                self.keys[i] = k if kept == 0 else torch.cat([self.keys[i], k], dim=2)
                self.values[i] = v if kept == 0 else torch.cat([self.values[i], v], dim=2)
            self.tokens = tokens
        return output
