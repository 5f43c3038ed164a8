"""What every block adapter (:mod:`diffexit.uem.block_adapters`) shares: the prepared forward pass and its helpers.

An adapter's ``begin`` binds the model's forward arguments (:func:`bind_forward`), runs the preamble and returns a
:class:`Pass`; per-row tensors are broadcast to one entry per batch row (:func:`per_row`) so that dropping the rows
that exited is one index over them; ``head`` turns tokens back into the model's output (:func:`unpatchify` for
models that output images).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn


@dataclass
class Pass:
    """One forward call, prepared for the block loop.

    ``rows`` holds every tensor the blocks and the head read per row (batch dimension first), so dropping rows is
    one index over it; ``fixed`` holds what all rows share.
    """

    hidden: torch.Tensor  # [B, N, D] the image tokens entering the first block
    cond: torch.Tensor  # [B, D] the conditioning vector the UEMs read
    rows: dict[str, Optional[torch.Tensor]]
    fixed: dict[str, Any]
    grid: Optional[tuple[int, int]]  # tokens per column and per row of the image; None where the output is tokens
    return_dict: bool


def per_row(t: Optional[torch.Tensor], batch: int, name: str) -> Optional[torch.Tensor]:
    """``t`` with one entry per row: a scalar or a batch of one is broadcast (the models broadcast it too)."""
    if t is None:
        return None
    if not torch.is_tensor(t):
        t = torch.tensor(t)
    if t.dim() == 0:
        return t.expand(batch)
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ValueError(f"{name} has {t.shape[0]} rows but the batch has {batch}")


def mask_biases(arguments: dict, dtype: torch.dtype, batch: int) -> dict[str, Optional[torch.Tensor]]:
    """The forward's ``attention_mask`` and ``encoder_attention_mask``, one per row, as the models convert them: a
    keep (1) / discard (0) mask ``[B, K]`` becomes an additive bias ``[B, 1, K]`` (0 or -10000); a bias stays."""
    masks = {}
    for name in ("attention_mask", "encoder_attention_mask"):
        mask = arguments[name]
        if mask is not None and mask.ndim == 2:
            mask = ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)
        masks[name] = per_row(mask, batch, name)
    return masks


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int], patch: int, channels: int) -> torch.Tensor:
    """``[b, gh * gw, p * p * C]`` patch tokens -> ``[b, C, gh * p, gw * p]`` images."""
    gh, gw = grid
    x = tokens.reshape(-1, gh, gw, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(-1, channels, gh * patch, gw * patch)


def bind_forward(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The model's forward arguments by name, defaults filled in."""
    bound = inspect.signature(type(model).forward).bind(model, *args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def refuse(model: nn.Module, unsupported: list[str], name: str, attention_kwargs: Optional[dict]) -> dict:
    """The attention kwargs (the forward's argument ``name``) the blocks get, after refusing what an exit cannot run
    through.

    ``unsupported`` names the forward arguments given that the adapter does not restate. IP-adapter image embeds
    and a LoRA scale other than 1 are refused as well: the models project the first in their forward and apply
    the second in a decorator around it, and the exit replaces both.
    """
    attention_kwargs = dict(attention_kwargs or {})
    if "ip_adapter_image_embeds" in attention_kwargs:
        unsupported = [*unsupported, f"{name}['ip_adapter_image_embeds']"]
    if attention_kwargs.pop("scale", 1.0) != 1.0:
        unsupported = [*unsupported, f"a LoRA scale in {name} (fuse the LoRA first: pipe.fuse_lora)"]
    if unsupported:
        raise ValueError(f"early exits on {type(model).__name__} do not support {', '.join(unsupported)}")
    return attention_kwargs
