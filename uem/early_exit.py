"""Early exits on an existing diffusers transformer, in one call.

    early_exit = enable_early_exit(pipe, uem, UncertaintyThreshold(0.1))   # or a transformer, or rule=0.1
    pipe.scheduler = ExitAwareScheduler(pipe.scheduler, early_exit)         # progress in, statistics out
    images = pipe(...).images                                                # called exactly as before
    disable_early_exit(pipe)

An exit after block ``k`` runs ``pos_embed -> blocks[:k] -> the model's own output head``: for
``DiTTransformer2DModel`` the adaLN-zero conditioning of the first block's embedder, the final norm, ``proj_out_1``,
``proj_out_2`` and unpatchify; for ``PixArtTransformer2DModel`` its ``scale_shift_table`` modulation, ``norm_out``
and ``proj_out``; for ``SD3Transformer2DModel`` its ``AdaLayerNormContinuous`` and ``proj_out``. Each model's
preamble (patch embedding, conditioning, caption projection, mask-to-bias conversion) is that of its own
``forward`` in diffusers 0.42, restated here so the block loop can stop and shrink part-way.

Decisions are per sample. After each block the exit rule (:mod:`diffexit.uem.exit_rules`) says which samples stop;
those rows go through the output head and leave the batch, so the remaining blocks run on fewer rows. With
classifier-free guidance the pipelines stack a batch as ``[cond; uncond]`` halves; the two rows of one sample are
one group, and a group stops when the rule lets the more uncertain of its two rows stop (the guided output
amplifies their difference, so both must be settled). ``cfg="auto"`` recognises a guided batch by its two
identical halves of noisy input, which is how DiT, PixArt and SD3 pipelines build it.

Why a diffusers hook rather than a wrapper module or a patched class: a ``ModelHook`` with ``new_forward``
registered in the model's ``HookRegistry`` is diffusers' own way to replace a model's forward (FirstBlockCache uses
it). The model object stays the same one the pipeline holds, ``inspect.signature(transformer.forward)`` still shows
the original arguments (pipelines inspect it), hooks on the blocks (offloading, layerwise casting) still fire
because blocks are still called as modules, a second registration is detectable by name, and removal hands back
the original bound ``forward``. :func:`disable_early_exit` also drops the registry when it was ours, so the model
ends exactly as it started.

Eval-mode semantics: DiT draws a fresh random class-label dropout in every embedder call in training mode; the early
exit forward computes the conditioning once per call, so it equals the original forward in eval mode.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from ..samplers.schedules import ThresholdSchedule
from .exit_rules import ExitRule, UncertaintyThreshold
from .heads import UEMStack, token_uncertainty

HOOK_NAME = "diffexit_early_exit"


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


class _DiT:
    """``DiTTransformer2DModel``: class-conditional adaLN-zero blocks, each with its own timestep+class embedder."""

    def begin(self, model, args, kwargs) -> _Pass:
        a = _bind(model, args, kwargs)
        x = a["hidden_states"]
        batch, p = x.shape[0], model.config.patch_size
        timestep = _per_row(a["timestep"], batch, "timestep")
        labels = _per_row(a["class_labels"], batch, "class_labels")
        hidden = model.pos_embed(x)
        # The output head conditions on the first block's embedder; the UEMs read the same vector.
        cond = model.transformer_blocks[0].norm1.emb(timestep, labels, hidden_dtype=hidden.dtype)
        return _Pass(
            hidden=hidden,
            cond=cond,
            rows={"timestep": timestep, "class_labels": labels, "cond": cond},
            fixed={"cross_attention_kwargs": a["cross_attention_kwargs"]},
            grid=(x.shape[-2] // p, x.shape[-1] // p),
            return_dict=a["return_dict"],
        )

    def block(self, model, index, hidden, rows, fixed):
        return model.transformer_blocks[index](
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


class _PixArt:
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
        return model.transformer_blocks[index](
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


class _SD3:
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
        text, hidden = model.transformer_blocks[index](
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


def _adapter_for(model: nn.Module):
    for cls, adapter in _ADAPTERS.items():
        if isinstance(model, cls):
            return adapter
    raise ValueError(f"early exits support {', '.join(SUPPORTED)}; got {type(model).__name__}")


def _transformer_of(pipe_or_transformer) -> nn.Module:
    if isinstance(pipe_or_transformer, nn.Module):
        return pipe_or_transformer
    model = getattr(pipe_or_transformer, "transformer", None)
    if isinstance(model, nn.Module):
        return model
    raise ValueError(
        f"expected a diffusers pipeline with a `transformer` or a transformer model, got "
        f"{type(pipe_or_transformer).__name__}"
    )


def _take(rows: dict, index: torch.Tensor) -> dict:
    return {k: (None if v is None else v[index]) for k, v in rows.items()}


class EarlyExit:
    """The early exits on one transformer: what :func:`enable_early_exit` returns.

    Attributes:
        transformer: the model.
        uem: its :class:`~diffexit.uem.heads.UEMStack` (``None`` for rules that read no UEM).
        num_blocks: the model's blocks.
        rule: the exit rule (assignable; checked against the model).
        cfg: ``"auto"``, ``True`` or ``False``: how guided ``[cond; uncond]`` batches are paired (see
            :func:`enable_early_exit`).
        progress: sampling progress in ``[0, 1]`` for the next call, or ``None``; ``ExitAwareScheduler`` sets it.
        depth_listener: called after every forward with the blocks each sample ran, int64 ``[G]`` (``G`` samples;
            a guided pair counts once); ``ExitAwareScheduler`` sets it.
        last_depths: the same tensor for the latest forward.
    """

    def __init__(self, transformer: nn.Module, uem: Optional[UEMStack], rule: ExitRule, cfg: Union[str, bool]):
        self.transformer = transformer
        self.uem = uem
        self.num_blocks = len(transformer.transformer_blocks)
        self.cfg = cfg
        self.rule = rule
        self.progress: Optional[float] = None
        self.depth_listener: Optional[Callable[[torch.Tensor], None]] = None
        self.last_depths: Optional[torch.Tensor] = None
        self._adapter = _adapter_for(transformer)

    @property
    def rule(self) -> ExitRule:
        return self._rule

    @rule.setter
    def rule(self, rule: Union[ExitRule, float, ThresholdSchedule]) -> None:
        """Swap the rule (checked against this model); a float or schedule means ``UncertaintyThreshold``."""
        if not isinstance(rule, ExitRule):
            rule = UncertaintyThreshold(rule)
        rule.check(self.num_blocks)
        if rule.needs_uem and self.uem is None:
            raise ValueError(f"{rule!r} reads the UEMs, but none were given; pass uem=UEMStack.from_pretrained(...)")
        self._rule = rule

    def _paired(self, tokens: torch.Tensor) -> bool:
        """Whether the batch is guided ``[cond; uncond]`` halves (``tokens``: the patch-embedded input)."""
        batch = tokens.shape[0]
        if self.cfg is True:
            if batch % 2:
                raise ValueError(f"cfg=True needs a batch of [cond; uncond] halves, got an odd batch of {batch}")
            return True
        if self.cfg is False or batch % 2:
            return False
        return torch.equal(tokens[: batch // 2], tokens[batch // 2 :])

    def _forward(self, model: nn.Module, args: tuple, kwargs: dict):
        adapter, num_blocks = self._adapter, self.num_blocks
        run = adapter.begin(model, args, kwargs)
        hidden, rows = run.hidden, run.rows
        batch, device = hidden.shape[0], hidden.device
        paired = self._paired(hidden)
        groups = batch // 2 if paired else batch
        rule, progress = self._rule, self.progress
        head_w = head_b = None
        if rule.needs_uem:
            uem = self.uem
            if uem.token_weight.device != device or uem.token_weight.dtype != hidden.dtype:
                uem.to(device=device, dtype=hidden.dtype)
            head_w, head_b = uem.token_heads(run.cond)
        active = torch.arange(groups, device=device)  # samples still running
        row_ids = torch.arange(batch, device=device)  # where each remaining row goes in the output
        depths = torch.full((groups,), num_blocks, dtype=torch.long, device=device)
        out = None
        for index in range(num_blocks):
            hidden = adapter.block(model, index, hidden, rows, run.fixed)
            depth = index + 1
            if depth == num_blocks:
                break

            def uncertainty(hidden=hidden, index=index):
                if head_w is None:
                    raise ValueError(f"{rule!r} asked for the uncertainty but says needs_uem=False")
                u = token_uncertainty(hidden, head_w[index], head_b[index]).mean(dim=1)
                if paired:
                    half = u.shape[0] // 2
                    u = torch.maximum(u[:half], u[half:])
                return u

            stop = rule.exits(depth, progress, uncertainty)
            if torch.is_tensor(stop):
                stopping = int(stop.sum())
                if stopping == 0:
                    continue
                if stopping < stop.shape[0]:
                    stop_rows = torch.cat([stop, stop]) if paired else stop
                    y = adapter.head(model, hidden[stop_rows], _take(rows, stop_rows), run.fixed, run.grid)
                    if out is None:
                        out = y.new_empty(batch, *y.shape[1:])
                    out[row_ids[stop_rows]] = y
                    depths[active[stop]] = depth
                    keep, keep_rows = ~stop, ~stop_rows
                    active, row_ids, hidden = active[keep], row_ids[keep_rows], hidden[keep_rows]
                    rows = _take(rows, keep_rows)
                    if rule.needs_uem:
                        head_w, head_b = head_w[:, keep_rows], head_b[:, keep_rows]
                    continue
            elif not stop:
                continue
            depths[active] = depth
            break
        y = adapter.head(model, hidden, rows, run.fixed, run.grid)
        if out is None:
            out = y
        else:
            out[row_ids] = y
        self.last_depths = depths
        if self.depth_listener is not None:
            self.depth_listener(depths)
        return Transformer2DModelOutput(sample=out) if run.return_dict else (out,)


class _EarlyExitHook(ModelHook):
    def __init__(self, early_exit: EarlyExit, had_registry: bool, had_forward_attr: bool):
        super().__init__()
        self.early_exit = early_exit
        self.had_registry = had_registry
        self.had_forward_attr = had_forward_attr

    def new_forward(self, module, *args, **kwargs):
        return self.early_exit._forward(module, args, kwargs)


def _hook_of(model: nn.Module) -> Optional[_EarlyExitHook]:
    registry = getattr(model, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(HOOK_NAME)


def enable_early_exit(
    pipe_or_transformer,
    uem: Optional[UEMStack],
    rule: Union[ExitRule, float, ThresholdSchedule],
    *,
    cfg: Union[str, bool] = "auto",
) -> EarlyExit:
    """Put early exits on a diffusers transformer (or a pipeline's ``.transformer``); the pipeline calls it unchanged.

    Args:
        pipe_or_transformer: a ``DiTTransformer2DModel``, ``PixArtTransformer2DModel`` or ``SD3Transformer2DModel``,
            or a pipeline holding one as ``.transformer``.
        uem: the model's UEMs (checked against its shape); ``None`` is allowed for rules that read none
            (``StaticDepth``, ``FullDepth``). Moved to the model's device and dtype on first use.
        rule: an :class:`~diffexit.uem.exit_rules.ExitRule`, or a threshold (float or ``ThresholdSchedule``)
            meaning ``UncertaintyThreshold(threshold)``.
        cfg: ``"auto"`` treats a batch whose two halves carry the same noisy input as guided ``[cond; uncond]``
            pairs that exit together; ``True`` always pairs the halves; ``False`` never does.

    Returns:
        The :class:`EarlyExit` controller: set ``.progress`` or hand it to ``ExitAwareScheduler``; swap ``.rule``.
    """
    model = _transformer_of(pipe_or_transformer)
    _adapter_for(model)
    if _hook_of(model) is not None:
        raise ValueError(
            f"early exits are already enabled on this {type(model).__name__}; call disable_early_exit first, "
            f"or change the rule on the EarlyExit it returned"
        )
    if cfg not in ("auto", True, False):
        raise ValueError(f"cfg must be 'auto', True or False, got {cfg!r}")
    if uem is not None:
        if not isinstance(uem, UEMStack):
            raise ValueError(f"uem must be a UEMStack (or None), got {type(uem).__name__}")
        uem.check_matches(model)
    early_exit = EarlyExit(model, uem, rule, cfg)
    had_registry = hasattr(model, "_diffusers_hook")
    hook = _EarlyExitHook(early_exit, had_registry, "forward" in vars(model))
    HookRegistry.check_if_exists_or_initialize(model).register_hook(hook, HOOK_NAME)
    return early_exit


def disable_early_exit(pipe_or_transformer) -> None:
    """Remove the early exits; the model's ``forward`` is its original one again."""
    model = _transformer_of(pipe_or_transformer)
    hook = _hook_of(model)
    if hook is None:
        raise ValueError(f"early exits are not enabled on this {type(model).__name__}")
    registry = model._diffusers_hook
    registry.remove_hook(HOOK_NAME, recurse=False)
    if not registry.hooks:
        if not hook.had_forward_attr:
            del model.forward
        if not hook.had_registry:
            del model._diffusers_hook


class ExitPredictions(NamedTuple):
    """What every exit of a model would output, for training and calibration."""

    sample: torch.Tensor  # [L, B, C, H, W]: the output head after each block
    uncertainty: torch.Tensor  # [L, B, N]: each block's per-token UEM output


def exit_predictions(
    transformer: nn.Module, uem: UEMStack, *args, backbone_grad: bool = True, **kwargs
) -> ExitPredictions:
    """Run all blocks once and apply the model's own output head and the UEM after every one of them.

    ``args`` / ``kwargs`` are the transformer's forward arguments. With ``backbone_grad=False`` the backbone runs
    without autograd (a frozen backbone: only the UEMs learn, and its activations are not kept).
    """
    adapter = _adapter_for(transformer)
    uem.check_matches(transformer)
    with torch.set_grad_enabled(backbone_grad and torch.is_grad_enabled()):
        run = adapter.begin(transformer, args, kwargs)
        hidden, states, samples = run.hidden, [], []
        for index in range(len(transformer.transformer_blocks)):
            hidden = adapter.block(transformer, index, hidden, run.rows, run.fixed)
            states.append(hidden)
            samples.append(adapter.head(transformer, hidden, run.rows, run.fixed, run.grid))
    return ExitPredictions(torch.stack(samples), uem(torch.stack(states), run.cond))
