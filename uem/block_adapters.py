"""How each supported diffusers transformer is run block by block, so an early exit can stop part-way.

An adapter splits a model's ``forward`` into ``begin`` (the preamble: patch embedding, conditioning, caption
projection, mask-to-bias conversion), ``block`` (one transformer block) and ``head`` (the model's own output head
and unpatchify). For ``DiTTransformer2DModel`` the head is the adaLN-zero conditioning of the first block's
embedder, the final norm, ``proj_out_1``, ``proj_out_2``; for ``PixArtTransformer2DModel`` its
``scale_shift_table`` modulation, ``norm_out`` and ``proj_out``; for ``SD3Transformer2DModel`` its
``AdaLayerNormContinuous`` and ``proj_out``. Each preamble is that of the model's own ``forward`` in diffusers 0.42,
restated here.

Per-row state (everything the blocks and the head read per batch row) sits in ``_Pass.rows``, so dropping rows
that exited is one index over it.

This module is also the one place that knows a model's layout: :func:`blocks`, :func:`num_blocks` and
:func:`hidden_size` answer for every supported class, so a model with another layout (two block stacks, no
``inner_dim``) needs an adapter here and nowhere else.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel
from torch import nn


@dataclass
class _Pass:
    """One forward call, prepared for the block loop.

    ``rows`` holds every tensor the blocks and the head read per row (batch dimension first), so dropping rows is
    one index over it; ``fixed`` holds what all rows share.
    """

    hidden: torch.Tensor  # [B, N, D] tokens after the patch embedding
    cond: torch.Tensor  # [B, D] the conditioning vector the UEMs read
    rows: dict[str, Optional[torch.Tensor]]
    fixed: dict[str, Any]
    grid: tuple[int, int]  # tokens per column and per row of the image
    return_dict: bool


def _per_row(t: Optional[torch.Tensor], batch: int, name: str) -> Optional[torch.Tensor]:
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


def _unpatchify(tokens: torch.Tensor, grid: tuple[int, int], patch: int, channels: int) -> torch.Tensor:
    """``[b, gh * gw, p * p * C]`` patch tokens -> ``[b, C, gh * p, gw * p]`` images."""
    gh, gw = grid
    x = tokens.reshape(-1, gh, gw, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(-1, channels, gh * patch, gw * patch)


def _bind(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    bound = inspect.signature(type(model).forward).bind(model, *args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


class _OneStack:
    """The layout of the supported models: one ``transformer_blocks`` stack of blocks ``inner_dim`` wide."""

    def blocks(self, model) -> nn.ModuleList:
        return model.transformer_blocks

    def hidden_size(self, model) -> int:
        return int(model.inner_dim)


class _DiT(_OneStack):
    """``DiTTransformer2DModel``: class-conditional adaLN-zero blocks, each with its own timestep+class embedder."""

    def begin(self, model, args, kwargs) -> _Pass:
        a = _bind(model, args, kwargs)
        x = a["hidden_states"]
        batch, p = x.shape[0], model.config.patch_size
        timestep = _per_row(a["timestep"], batch, "timestep")
        labels = _per_row(a["class_labels"], batch, "class_labels")
        hidden = model.pos_embed(x)
        # The output head conditions on the first block's embedder; the UEMs read the same vector.
        cond = self.blocks(model)[0].norm1.emb(timestep, labels, hidden_dtype=hidden.dtype)
        return _Pass(
            hidden=hidden,
            cond=cond,
            rows={"timestep": timestep, "class_labels": labels, "cond": cond},
            fixed={"cross_attention_kwargs": a["cross_attention_kwargs"]},
            grid=(x.shape[-2] // p, x.shape[-1] // p),
            return_dict=a["return_dict"],
        )

    def block(self, model, index, hidden, rows, fixed):
        return self.blocks(model)[index](
            hidden,
            attention_mask=None,
            encoder_hidden_states=None,
            encoder_attention_mask=None,
            timestep=rows["timestep"],
            cross_attention_kwargs=fixed["cross_attention_kwargs"],
            class_labels=rows["class_labels"],
        )

    def head(self, model, hidden, rows, fixed, grid):
        shift, scale = model.proj_out_1(F.silu(rows["cond"])).chunk(2, dim=1)
        hidden = model.norm_out(hidden) * (1 + scale[:, None]) + shift[:, None]
        return _unpatchify(model.proj_out_2(hidden), grid, model.config.patch_size, model.out_channels)


class _PixArt(_OneStack):
    """``PixArtTransformer2DModel``: adaLN-single blocks with cross-attention to a caption."""

    def begin(self, model, args, kwargs) -> _Pass:
        a = _bind(model, args, kwargs)
        if model.use_additional_conditions and a["added_cond_kwargs"] is None:
            raise ValueError("`added_cond_kwargs` cannot be None when using additional conditions for `adaln_single`.")
        x = a["hidden_states"]
        batch, p = x.shape[0], model.config.patch_size
        masks = {}
        for name in ("attention_mask", "encoder_attention_mask"):
            mask = a[name]
            if mask is not None and mask.ndim == 2:
                # A keep/discard mask becomes an additive bias with a singleton query axis, as in the model.
                mask = ((1 - mask.to(x.dtype)) * -10000.0).unsqueeze(1)
            masks[name] = _per_row(mask, batch, name)
        hidden = model.pos_embed(x)
        timestep, embedded = model.adaln_single(
            a["timestep"], a["added_cond_kwargs"], batch_size=batch, hidden_dtype=hidden.dtype
        )
        text = a["encoder_hidden_states"]
        if model.caption_projection is not None:
            text = model.caption_projection(text).view(batch, -1, hidden.shape[-1])
        return _Pass(
            hidden=hidden,
            cond=embedded,
            rows={
                "timestep": _per_row(timestep, batch, "timestep"),
                "embedded_timestep": _per_row(embedded, batch, "timestep"),
                "encoder_hidden_states": _per_row(text, batch, "encoder_hidden_states"),
                **masks,
            },
            fixed={"cross_attention_kwargs": a["cross_attention_kwargs"]},
            grid=(x.shape[-2] // p, x.shape[-1] // p),
            return_dict=a["return_dict"],
        )

    def block(self, model, index, hidden, rows, fixed):
        return self.blocks(model)[index](
            hidden,
            attention_mask=rows["attention_mask"],
            encoder_hidden_states=rows["encoder_hidden_states"],
            encoder_attention_mask=rows["encoder_attention_mask"],
            timestep=rows["timestep"],
            cross_attention_kwargs=fixed["cross_attention_kwargs"],
            class_labels=None,
        )

    def head(self, model, hidden, rows, fixed, grid):
        table = model.scale_shift_table
        shift, scale = (table[None] + rows["embedded_timestep"][:, None].to(table.device)).chunk(2, dim=1)
        hidden = model.norm_out(hidden) * (1 + scale.to(hidden.device)) + shift.to(hidden.device)
        return _unpatchify(model.proj_out(hidden), grid, model.config.patch_size, model.out_channels)


class _SD3(_OneStack):
    """``SD3Transformer2DModel``: joint (MM-DiT) blocks; the text stream is per-row state that evolves per block."""

    def begin(self, model, args, kwargs) -> _Pass:
        a = _bind(model, args, kwargs)
        unsupported = [n for n in ("block_controlnet_hidden_states", "skip_layers") if a[n] is not None]
        joint = dict(a["joint_attention_kwargs"] or {})
        if "ip_adapter_image_embeds" in joint:
            unsupported.append("joint_attention_kwargs['ip_adapter_image_embeds']")
        if joint.pop("scale", 1.0) != 1.0:
            unsupported.append("a LoRA scale in joint_attention_kwargs (fuse the LoRA first: pipe.fuse_lora)")
        if unsupported:
            raise ValueError(f"early exits on SD3Transformer2DModel do not support {', '.join(unsupported)}")
        x = a["hidden_states"]
        batch, p = x.shape[0], model.config.patch_size
        hidden = model.pos_embed(x).contiguous()
        temb = model.time_text_embed(a["timestep"], a["pooled_projections"])
        text = model.context_embedder(a["encoder_hidden_states"])
        return _Pass(
            hidden=hidden,
            cond=temb,
            rows={"temb": _per_row(temb, batch, "timestep"), "encoder_hidden_states": _per_row(text, batch, "text")},
            fixed={"joint_attention_kwargs": joint},
            grid=(x.shape[-2] // p, x.shape[-1] // p),
            return_dict=a["return_dict"],
        )

    def block(self, model, index, hidden, rows, fixed):
        text, hidden = self.blocks(model)[index](
            hidden_states=hidden,
            encoder_hidden_states=rows["encoder_hidden_states"],
            temb=rows["temb"],
            joint_attention_kwargs=fixed["joint_attention_kwargs"],
        )
        rows["encoder_hidden_states"] = text
        return hidden

    def head(self, model, hidden, rows, fixed, grid):
        hidden = model.proj_out(model.norm_out(hidden, rows["temb"]))
        return _unpatchify(hidden, grid, model.config.patch_size, model.out_channels)


_ADAPTERS = {DiTTransformer2DModel: _DiT(), PixArtTransformer2DModel: _PixArt(), SD3Transformer2DModel: _SD3()}
SUPPORTED = tuple(cls.__name__ for cls in _ADAPTERS)


def adapter_for(model: nn.Module):
    """The adapter for ``model``'s class; ``ValueError`` naming the supported ones for any other."""
    for cls, adapter in _ADAPTERS.items():
        if isinstance(model, cls):
            return adapter
    raise ValueError(f"early exits support {', '.join(SUPPORTED)}; got {type(model).__name__}, which has no "
                     f"adapter in diffexit.uem.block_adapters")


def blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of ``model``, in the order its forward runs them."""
    return adapter_for(model).blocks(model)


def num_blocks(model: nn.Module) -> int:
    """How many transformer blocks ``model`` runs per forward (the deepest exit)."""
    return len(blocks(model))


def hidden_size(model: nn.Module) -> int:
    """The width ``D`` of the tokens between ``model``'s blocks (what a UEM head reads)."""
    return adapter_for(model).hidden_size(model)


def supported_class(name: str) -> type:
    """The supported model class called ``name`` (as a UEM config's ``model_class`` records it)."""
    for cls in _ADAPTERS:
        if cls.__name__ == name:
            return cls
    raise ValueError(f"early exits support {', '.join(SUPPORTED)}; got {name}, which has no adapter in "
                     f"diffexit.uem.block_adapters")
