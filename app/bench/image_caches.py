"""diffusers' own cache hooks as ``diffexit bench images`` comparators: FirstBlockCache, TaylorSeer and MagCache on a
DiT, which has no ``enable_cache``, so each goes on through its ``apply_*`` function.

FasterCache and Pyramid Attention Broadcast are left out: both reuse attention outputs inside blocks that still run
(their norms and MLPs too), so on the bench's cost axis (blocks run) they would show no saving, and FasterCache's
guidance reuse expects separate cond and uncond calls, where the DiT pipelines batch the two.
"""

from __future__ import annotations

import ast
import contextlib
import io
from typing import Iterator

import torch

MAG_CALIBRATION_SEED = 10_000  # the magnitude ratios come from noise that no benchmarked image is drawn from


@contextlib.contextmanager
def fresh_cache(model) -> Iterator[None]:
    """One pipeline call's cache context on ``model``, starting from an empty cache."""
    # DiT is no CacheMixin, and neither DiTPipeline nor ours names a cache context or resets the cache, so both
    # happen here. The reset makes each call start afresh rather than carry the previous call's state (its last
    # residual, its step count) into the next. CacheMixin.cache_context only sets the hooks' state, so it serves any
    # model; one context covers the whole call because the guided batch holds cond and uncond rows together.
    from diffusers.hooks import HookRegistry
    from diffusers.models.cache_utils import CacheMixin

    HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)
    with CacheMixin.cache_context(model, "cond"):
        yield


def apply_first_block_cache(model, threshold: float) -> None:
    """diffusers' FirstBlockCache at ``threshold`` (its default is 0.05)."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache as apply

    apply(model, FirstBlockCacheConfig(threshold=threshold))


def apply_taylorseer(model, interval: int, warmup: int) -> None:
    """diffusers' TaylorSeer, first order with float32 factors, on every transformer block's output: ``warmup`` full
    steps, then one full step in every ``interval``; between them each block's output is extrapolated, so no block
    runs (its default hooks the attention modules only, which would leave every block running)."""
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    apply_taylorseer_cache(model, TaylorSeerCacheConfig(
        cache_interval=interval, disable_cache_before_step=warmup, max_order=1, taylor_factors_dtype=torch.float32,
        cache_identifiers=[r"transformer_blocks\.\d+"]))


def mag_ratios(pipe, steps: int, guidance_scale: float) -> list[float]:
    """The magnitude ratios diffusers' MagCache calibration (``calibrate=True``) prints for ``pipe``'s transformer:
    one call of one image per digit at ``steps`` steps from :data:`MAG_CALIBRATION_SEED`. ``pipe`` is hooked for
    it, so pass a copy."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    apply_mag_cache(pipe.transformer, MagCacheConfig(calibrate=True, num_inference_steps=steps))
    printed = io.StringIO()
    with torch.no_grad(), contextlib.redirect_stdout(printed), fresh_cache(pipe.transformer):
        pipe(list(range(10)), guidance_scale=guidance_scale, num_inference_steps=steps, output_type="pt",
             generator=torch.Generator().manual_seed(MAG_CALIBRATION_SEED))
    # diffusers hands the ratios over only as the printed list that follows its completion message.
    lines = printed.getvalue().splitlines()
    marks = [i for i, line in enumerate(lines) if "Calibration Complete" in line]
    if not marks or marks[-1] + 1 >= len(lines):
        raise ValueError("diffusers' MagCache calibration printed no magnitude ratios")
    return [float(r) for r in ast.literal_eval(lines[marks[-1] + 1].strip())]


def apply_magcache(model, ratios: list[float], threshold: float, max_skip: int, steps: int) -> None:
    """diffusers' MagCache at ``threshold``, skipping at most ``max_skip`` steps in a row (its default retention of
    the first 20% of steps), with ``ratios`` from :func:`mag_ratios`."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    apply_mag_cache(model, MagCacheConfig(threshold=threshold, max_skip_steps=max_skip, num_inference_steps=steps,
                                          mag_ratios=ratios))
