"""How each supported diffusers transformer is run block by block, so an early exit can stop part-way.

An adapter splits a model's ``forward`` into ``begin`` (the preamble: patch embedding, conditioning, caption
projection, mask-to-bias conversion, rotary embedding), ``block`` (one transformer block) and ``head`` (the model's
own output head, and unpatchify where the model outputs images). The heads: for ``DiTTransformer2DModel`` the
adaLN-zero conditioning of the first block's embedder, the final norm, ``proj_out_1``, ``proj_out_2``; for
``PixArtTransformer2DModel`` and ``SanaTransformer2DModel`` the ``scale_shift_table`` modulation, ``norm_out`` and
``proj_out``; for ``SD3Transformer2DModel`` and ``FluxTransformer2DModel`` the ``AdaLayerNormContinuous`` and
``proj_out``. Each preamble is that of the model's own ``forward`` in diffusers 0.42, restated here.

Per-row state (everything the blocks and the head read per batch row) sits in ``Pass.rows``
(:mod:`diffexit.uem.adapter_pass`), so dropping rows that exited is one index over it.

This module is also the one place that knows a model's layout: :func:`blocks`, :func:`num_blocks` and
:func:`hidden_size` answer for every supported class (Flux's two block stacks behind one index, Sana's width
without ``inner_dim``), so a model with another layout needs an adapter here and nowhere else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
)
from torch import nn

from .adapter_pass import Pass, bind_forward, mask_biases, per_row, refuse, unpatchify


class _OneStack:
    """The layout of DiT, PixArt and SD3: one ``transformer_blocks`` stack of blocks ``inner_dim`` wide."""

    def blocks(self, model) -> nn.ModuleList:
        return model.transformer_blocks

    def hidden_size(self, model) -> int:
        return int(model.inner_dim)


class _DiT(_OneStack):
    """``DiTTransformer2DModel``: class-conditional adaLN-zero blocks, each with its own timestep+class embedder."""

    def begin(self, model, args, kwargs) -> Pass:
        a = bind_forward(model, args, kwargs)
        x = a["hidden_states"]
        batch, p = x.shape[0], model.config.patch_size
        timestep = per_row(a["timestep"], batch, "timestep")
        labels = per_row(a["class_labels"], batch, "class_labels")
        hidden = model.pos_embed(x)
        # The output head conditions on the first block's embedder; the UEMs read the same vector.
        cond = self.blocks(model)[0].norm1.emb(timestep, labels, hidden_dtype=hidden.dtype)
        return Pass(
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
        return unpatchify(model.proj_out_2(hidden), grid, model.config.patch_size, model.out_channels)


class _PixArt(_OneStack):
    """``PixArtTransformer2DModel``: adaLN-single blocks with cross-attention to a caption."""

    def begin(self, model, args, kwargs) -> Pass:
        a = bind_forward(model, args, kwargs)
        if model.use_additional_conditions and a["added_cond_kwargs"] is None:
            raise ValueError("`added_cond_kwargs` cannot be None when using additional conditions for `adaln_single`.")
        x = a["hidden_states"]
        batch, p = x.shape[0], model.config.patch_size
        masks = mask_biases(a, x.dtype, batch)
        hidden = model.pos_embed(x)
        timestep, embedded = model.adaln_single(
            a["timestep"], a["added_cond_kwargs"], batch_size=batch, hidden_dtype=hidden.dtype
        )
        text = a["encoder_hidden_states"]
        if model.caption_projection is not None:
            text = model.caption_projection(text).view(batch, -1, hidden.shape[-1])
        return Pass(
            hidden=hidden,
            cond=embedded,
            rows={
                "timestep": per_row(timestep, batch, "timestep"),
                "embedded_timestep": per_row(embedded, batch, "timestep"),
                "encoder_hidden_states": per_row(text, batch, "encoder_hidden_states"),
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
        return unpatchify(model.proj_out(hidden), grid, model.config.patch_size, model.out_channels)


class _SD3(_OneStack):
    """``SD3Transformer2DModel``: joint (MM-DiT) blocks; the text stream is per-row state that evolves per block."""

    def begin(self, model, args, kwargs) -> Pass:
        a = bind_forward(model, args, kwargs)
        unsupported = [n for n in ("block_controlnet_hidden_states", "skip_layers") if a[n] is not None]
        joint = refuse(model, unsupported, "joint_attention_kwargs", a["joint_attention_kwargs"])
        x = a["hidden_states"]
        batch, p = x.shape[0], model.config.patch_size
        hidden = model.pos_embed(x).contiguous()
        temb = model.time_text_embed(a["timestep"], a["pooled_projections"])
        text = model.context_embedder(a["encoder_hidden_states"])
        return Pass(
            hidden=hidden,
            cond=temb,
            rows={"temb": per_row(temb, batch, "timestep"), "encoder_hidden_states": per_row(text, batch, "text")},
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
        return unpatchify(hidden, grid, model.config.patch_size, model.out_channels)


class _Flux:
    """``FluxTransformer2DModel``: dual-stream (MM-DiT) blocks, then single-stream blocks, behind one block index.

    Block ``i < len(transformer_blocks)`` is dual-stream block ``i``; the rest are the single-stream blocks in order.
    The text stream is per-row state in both stacks (the single-stream blocks take it apart from the image tokens
    and hand it back), so the tokens between blocks, which the UEMs and the head read, are the image's only. The
    rotary embedding of the text and image positions is shared by all rows. The output stays packed tokens
    ``[B, N, C]``, as the model's own.
    """

    def blocks(self, model) -> nn.ModuleList:
        return nn.ModuleList([*model.transformer_blocks, *model.single_transformer_blocks])

    def hidden_size(self, model) -> int:
        return int(model.inner_dim)

    def begin(self, model, args, kwargs) -> Pass:
        a = bind_forward(model, args, kwargs)
        unsupported = [n for n in ("controlnet_block_samples", "controlnet_single_block_samples") if a[n] is not None]
        joint = refuse(model, unsupported, "joint_attention_kwargs", a["joint_attention_kwargs"])
        hidden = model.x_embedder(a["hidden_states"])
        batch = hidden.shape[0]
        # The pipelines pass sigmas in [0, 1]; the embedders take the model's 0..1000 timestep scale.
        timestep = a["timestep"].to(hidden.dtype) * 1000
        guidance = a["guidance"]
        if guidance is None:
            temb = model.time_text_embed(timestep, a["pooled_projections"])
        else:
            temb = model.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, a["pooled_projections"])
        text = model.context_embedder(a["encoder_hidden_states"])
        # A batch axis on the ids is deprecated; the model reads the first row's.
        txt_ids, img_ids = (ids[0] if ids.ndim == 3 else ids for ids in (a["txt_ids"], a["img_ids"]))
        return Pass(
            hidden=hidden,
            cond=temb,
            rows={"temb": per_row(temb, batch, "timestep"), "encoder_hidden_states": per_row(text, batch, "text")},
            fixed={"joint_attention_kwargs": joint,
                   "image_rotary_emb": model.pos_embed(torch.cat((txt_ids, img_ids), dim=0))},
            grid=None,
            return_dict=a["return_dict"],
        )

    def block(self, model, index, hidden, rows, fixed):
        dual = len(model.transformer_blocks)
        block = model.transformer_blocks[index] if index < dual else model.single_transformer_blocks[index - dual]
        text, hidden = block(
            hidden_states=hidden,
            encoder_hidden_states=rows["encoder_hidden_states"],
            temb=rows["temb"],
            image_rotary_emb=fixed["image_rotary_emb"],
            joint_attention_kwargs=fixed["joint_attention_kwargs"],
        )
        rows["encoder_hidden_states"] = text
        return hidden

    def head(self, model, hidden, rows, fixed, grid):
        return model.proj_out(model.norm_out(hidden, rows["temb"]))


class _Sana:
    """``SanaTransformer2DModel``: linear-attention blocks with cross-attention to a caption and a convolutional
    feed-forward over the token grid; no ``inner_dim`` attribute (its width is heads x head width)."""

    def blocks(self, model) -> nn.ModuleList:
        return model.transformer_blocks

    def hidden_size(self, model) -> int:
        return int(model.config.num_attention_heads * model.config.attention_head_dim)

    def begin(self, model, args, kwargs) -> Pass:
        a = bind_forward(model, args, kwargs)
        refuse(model, ["controlnet_block_samples"] if a["controlnet_block_samples"] is not None else [],
               "attention_kwargs", a["attention_kwargs"])
        x = a["hidden_states"]
        batch, p = x.shape[0], model.config.patch_size
        masks = mask_biases(a, x.dtype, batch)
        hidden = model.patch_embed(x)
        if a["guidance"] is None:
            timestep, embedded = model.time_embed(a["timestep"], batch_size=batch, hidden_dtype=hidden.dtype)
        else:
            timestep, embedded = model.time_embed(a["timestep"], guidance=a["guidance"], hidden_dtype=hidden.dtype)
        text = model.caption_projection(a["encoder_hidden_states"]).view(batch, -1, hidden.shape[-1])
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        return Pass(
            hidden=hidden,
            cond=embedded,
            rows={
                "timestep": per_row(timestep, batch, "timestep"),
                "embedded_timestep": per_row(embedded, batch, "timestep"),
                "encoder_hidden_states": per_row(model.caption_norm(text), batch, "encoder_hidden_states"),
                **masks,
            },
            fixed={"grid": grid},
            grid=grid,
            return_dict=a["return_dict"],
        )

    def block(self, model, index, hidden, rows, fixed):
        # The feed-forward convolves over the token grid, so every block needs its height and width.
        gh, gw = fixed["grid"]
        return self.blocks(model)[index](
            hidden, rows["attention_mask"], rows["encoder_hidden_states"], rows["encoder_attention_mask"],
            rows["timestep"], gh, gw,
        )

    def head(self, model, hidden, rows, fixed, grid):
        hidden = model.norm_out(hidden, rows["embedded_timestep"], model.scale_shift_table)
        channels = model.config.out_channels or model.config.in_channels
        return unpatchify(model.proj_out(hidden), grid, model.config.patch_size, channels)


_ADAPTERS = {
    DiTTransformer2DModel: _DiT(),
    PixArtTransformer2DModel: _PixArt(),
    SD3Transformer2DModel: _SD3(),
    FluxTransformer2DModel: _Flux(),
    SanaTransformer2DModel: _Sana(),
}
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
