"""Early exits on an existing diffusers transformer, in one call.

    early_exit = enable_early_exit(pipe, uem, UncertaintyThreshold(0.1))   # or a transformer, or rule=0.1
    pipe.scheduler = ExitAwareScheduler(pipe.scheduler, early_exit)         # progress in, statistics out
    images = pipe(...).images                                                # called exactly as before
    disable_early_exit(pipe)

An exit after block ``k`` runs ``pos_embed -> blocks[:k] -> the model's own output head``; how each supported
model's preamble, blocks and head are called is in :mod:`diffexit.uem.block_adapters`.

Decisions are per sample. After each block the exit rule (:mod:`diffexit.uem.exit_rules`) says which samples stop;
those rows go through the output head and leave the batch, so the remaining blocks run on fewer rows. With
classifier-free guidance the pipelines stack a batch as ``[cond; uncond]`` halves; the two rows of one sample are
one group, and a group stops when the rule lets the more uncertain of its two rows stop (the guided output
amplifies their difference, so both must be settled). ``cfg="auto"`` recognises a guided batch by its two
identical halves of noisy input, which is how DiT, PixArt and SD3 pipelines build it.

With a cached remainder (:mod:`diffexit.uem.cached_remainder`) an exited row's head reads its state plus the
residuals its skipped blocks added when they last ran it, and the remainder's refresh steps run every block.

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

from typing import Callable, NamedTuple, Optional, Union

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from ..common.schedules import ThresholdSchedule
from .block_adapters import SUPPORTED, adapter_for, num_blocks
from .cached_remainder import REFRESH, SKIP, CachedRemainder
from .exit_rules import ExitRule, UncertaintyThreshold
from .heads import UEMStack, token_uncertainty

HOOK_NAME = "diffexit_early_exit"


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
        remainder: the :class:`~diffexit.uem.cached_remainder.CachedRemainder` that exited samples add, or
            ``None`` (an exit hands the head the hidden state it has).
        depth_listener: called after every forward with the blocks each sample ran, int64 ``[G]`` (``G`` samples;
            a guided pair counts once; 0 at a remainder's skipped step); ``ExitAwareScheduler`` sets it.
        last_depths: the same tensor for the latest forward.
    """

    def __init__(self, transformer: nn.Module, uem: Optional[UEMStack], rule: ExitRule, cfg: Union[str, bool],
                 remainder: Optional[CachedRemainder] = None):
        self.transformer = transformer
        self.remainder = remainder
        self.uem = uem
        self.num_blocks = num_blocks(transformer)
        self.cfg = cfg
        self.rule = rule
        self.progress: Optional[float] = None
        self.depth_listener: Optional[Callable[[torch.Tensor], None]] = None
        self.last_depths: Optional[torch.Tensor] = None
        self._adapter = adapter_for(transformer)

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

    def _forward(self, model: nn.Module, args: tuple, kwargs: dict, original: Callable):
        adapter, num_blocks = self._adapter, self.num_blocks
        rule, progress, cache = self._rule, self.progress, self.remainder
        first = rule.first_exit(progress, num_blocks)
        if first >= num_blocks and cache is None:
            # Nothing can exit at this step: the model's own forward, with no per-block bookkeeping.
            out = original(*args, **kwargs)
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self._report(torch.full((x.shape[0] // 2 if self._paired(x) else x.shape[0],), num_blocks,
                                    dtype=torch.long, device=x.device))
            return out
        run = adapter.begin(model, args, kwargs)
        hidden, rows = run.hidden, run.rows
        batch, device = hidden.shape[0], hidden.device
        step = None if cache is None else cache.begin(progress, batch)
        if step == REFRESH:
            first = num_blocks  # every block runs and records its residual
        paired = self._paired(hidden)
        groups = batch // 2 if paired else batch
        if step == SKIP:
            # No block runs: the head reads the state it read last, reused or extrapolated.
            y = adapter.head(model, cache.state(torch.arange(batch, device=device)), rows, run.fixed, run.grid)
            self._report(torch.zeros(groups, dtype=torch.long, device=device))
            return Transformer2DModelOutput(sample=y) if run.return_dict else (y,)
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
        ran = num_blocks  # blocks the rows still in the batch ran when the loop ends

        def exit_state(hidden, depth, ids):
            # What the head reads for rows leaving after `depth` blocks: their state, plus the skipped blocks'
            # cached residuals when there is a remainder (which keeps it for the steps that run no block).
            if cache is None:
                return hidden
            state = hidden if depth == num_blocks else hidden + cache.remainder(depth, ids)
            cache.record_state(ids, state)
            return state

        for index in range(num_blocks):
            before = hidden
            hidden = adapter.block(model, index, hidden, rows, run.fixed)
            if cache is not None:
                cache.record(index, row_ids, hidden - before)
            depth = index + 1
            if depth == num_blocks:
                break
            if depth < first:
                continue

            def uncertainty(hidden=hidden, before=before, index=index):
                if rule.statistic == "change":
                    u = (hidden - before).flatten(1).norm(dim=1) / before.flatten(1).norm(dim=1)
                elif head_w is None:
                    raise ValueError(f"{rule!r} asked for the uncertainty but says needs_uem=False")
                else:
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
                    leaving = row_ids[stop_rows]
                    y = adapter.head(model, exit_state(hidden[stop_rows], depth, leaving), _take(rows, stop_rows),
                                     run.fixed, run.grid)
                    if out is None:
                        out = y.new_empty(batch, *y.shape[1:])
                    out[leaving] = y
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
            ran = depth
            break
        y = adapter.head(model, exit_state(hidden, ran, row_ids), rows, run.fixed, run.grid)
        if out is None:
            out = y
        else:
            out[row_ids] = y
        self._report(depths)
        return Transformer2DModelOutput(sample=out) if run.return_dict else (out,)

    def _report(self, depths: torch.Tensor) -> None:
        self.last_depths = depths
        if self.depth_listener is not None:
            self.depth_listener(depths)


class _EarlyExitHook(ModelHook):
    def __init__(self, early_exit: EarlyExit, had_registry: bool, had_forward_attr: bool):
        super().__init__()
        self.early_exit = early_exit
        self.had_registry = had_registry
        self.had_forward_attr = had_forward_attr

    def new_forward(self, module, *args, **kwargs):
        return self.early_exit._forward(module, args, kwargs, self.fn_ref.original_forward)


def _hook_of(model: nn.Module) -> Optional[_EarlyExitHook]:
    registry = getattr(model, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(HOOK_NAME)


def enable_early_exit(
    pipe_or_transformer,
    uem: Optional[UEMStack],
    rule: Union[ExitRule, float, ThresholdSchedule],
    *,
    cfg: Union[str, bool] = "auto",
    remainder: Optional[CachedRemainder] = None,
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
        remainder: a :class:`~diffexit.uem.cached_remainder.CachedRemainder`: an exited sample's skipped blocks add
            their cached residuals (and whole steps run at full depth to refresh them); ``None``: they add nothing.

    Returns:
        The :class:`EarlyExit` controller: set ``.progress`` or hand it to ``ExitAwareScheduler``; swap ``.rule``.
    """
    model = _transformer_of(pipe_or_transformer)
    adapter_for(model)
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
    if remainder is not None and not isinstance(remainder, CachedRemainder):
        raise ValueError(f"remainder must be a CachedRemainder (or None), got {type(remainder).__name__}")
    early_exit = EarlyExit(model, uem, rule, cfg, remainder)
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
    uncertainty: Optional[torch.Tensor]  # [L, B, N]: each block's per-token UEM output (None without UEMs)
    change: torch.Tensor  # [L, B]: ||h_k - h_{k-1}|| / ||h_{k-1}|| per row, the similarity exit's statistic


def exit_predictions(
    transformer: nn.Module, uem: Optional[UEMStack], *args, backbone_grad: bool = True, **kwargs
) -> ExitPredictions:
    """Run all blocks once and apply the model's own output head and the UEM (if given) after every one of them.

    ``args`` / ``kwargs`` are the transformer's forward arguments. With ``backbone_grad=False`` the backbone runs
    without autograd (a frozen backbone: only the UEMs learn, and its activations are not kept).
    """
    adapter = adapter_for(transformer)
    if uem is not None:
        uem.check_matches(transformer)
    with torch.set_grad_enabled(backbone_grad and torch.is_grad_enabled()):
        run = adapter.begin(transformer, args, kwargs)
        hidden, states, samples, change = run.hidden, [], [], []
        for index in range(num_blocks(transformer)):
            before = hidden
            hidden = adapter.block(transformer, index, hidden, run.rows, run.fixed)
            change.append((hidden - before).flatten(1).norm(dim=1) / before.flatten(1).norm(dim=1))
            states.append(hidden)
            samples.append(adapter.head(transformer, hidden, run.rows, run.fixed, run.grid))
    uncertainty = None if uem is None else uem(torch.stack(states), run.cond)
    return ExitPredictions(torch.stack(samples), uncertainty, torch.stack(change))
