"""A real DiTPipeline (tiny random VAE and DiT, 1000 classes, class 1000 the null class) with the swap-ins."""

import inspect

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DPMSolverMultistepScheduler

from diffexit.samplers import ExitAwareScheduler, ThresholdSchedule
from diffexit.uem import (
    FullDepth,
    StaticDepth,
    UncertaintyThreshold,
    disable_early_exit,
    enable_early_exit,
)

LAYERS = 4
STEPS = 6


def tiny_pipe(tiny_dit, scheduler_cls=DDIMScheduler):
    transformer = tiny_dit(layers=LAYERS, in_channels=4, out_channels=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=8,
    )
    return DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=scheduler_cls())


def run(pipe, labels=(3, 7, 999), **kwargs):
    return pipe(list(labels), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(5), output_type="pt",
                **kwargs).images


def test_full_depth_swap_in_reproduces_the_pipeline_and_counts_every_block(tiny_dit):
    pipe = tiny_pipe(tiny_dit)
    ref = run(pipe)
    early = enable_early_exit(pipe, None, FullDepth())
    pipe.scheduler = ExitAwareScheduler(pipe.scheduler, early)
    torch.testing.assert_close(run(pipe), ref, rtol=0, atol=1e-6)
    stats = pipe.scheduler.statistics
    assert stats.depths.shape == (STEPS, 3)  # three samples; each guided pair counted once
    assert torch.equal(stats.timesteps, pipe.scheduler.timesteps.double())
    assert stats.layer_ratio == 1.0
    assert stats.depth_counts.shape == (STEPS, LAYERS)
    assert stats.depth_counts[:, -1].tolist() == [3] * STEPS and stats.depth_counts[:, :-1].sum() == 0


def test_static_schedule_uses_the_step_progress(tiny_dit):
    pipe = tiny_pipe(tiny_dit)
    early = enable_early_exit(pipe, None, StaticDepth((1, 2, 4)))
    pipe.scheduler = ExitAwareScheduler(pipe.scheduler, early)
    run(pipe)
    stats = pipe.scheduler.statistics
    # progress i/5 for 6 steps: 0, .2 -> 1 block; .4, .6 -> 2 blocks; .8, 1 -> 4 blocks
    assert stats.depths[:, 0].tolist() == [1, 1, 2, 2, 4, 4]
    assert stats.layer_ratio == pytest.approx((2 * 1 + 2 * 2 + 2 * 4) / (6 * LAYERS))
    assert stats.depth_counts[0].tolist() == [3, 0, 0, 0]
    # a new call starts a new record
    run(pipe, labels=(1,))
    assert pipe.scheduler.statistics.depths.shape == (STEPS, 1)


def test_depth_counts_leave_out_steps_that_run_no_block(tiny_dit):
    from diffexit.uem.cached_remainder import CachedRemainder

    pipe = tiny_pipe(tiny_dit)
    # Refresh at step 0, then the rule (depth 1) at one step in every two from step 2; steps 1, 3, 5 run no block.
    remainder = CachedRemainder(order=0, exit_every=2)
    early = enable_early_exit(pipe, None, StaticDepth([1]), remainder=remainder)
    pipe.scheduler = ExitAwareScheduler(pipe.scheduler, early)
    run(pipe)
    stats = pipe.scheduler.statistics
    depths = stats.depths[:, 0].tolist()
    assert depths == [LAYERS, 0, 1, 0, 1, 0]
    counts = stats.depth_counts
    assert counts.shape == (STEPS, LAYERS)
    # Re-derived per step: a column per depth 1..L, a step at depth 0 counted in none.
    for step, depth in enumerate(depths):
        want = [3 if d == depth else 0 for d in range(1, LAYERS + 1)]
        assert counts[step].tolist() == want, step


def test_uncertainty_threshold_in_a_pipeline_with_dpm_solver(tiny_dit, spread_uem):
    pipe = tiny_pipe(tiny_dit, DPMSolverMultistepScheduler)
    ref = run(pipe)
    rule = UncertaintyThreshold(ThresholdSchedule("linear", 0.9, 0.0))
    early = enable_early_exit(pipe, spread_uem(pipe.transformer), rule)
    pipe.scheduler = ExitAwareScheduler(pipe.scheduler, early)
    images = run(pipe)
    stats = pipe.scheduler.statistics
    assert images.shape == ref.shape and torch.isfinite(images).all()
    assert stats.depths[-1].tolist() == [LAYERS] * 3  # threshold 0 at the last step: nothing exits
    assert 0 < stats.layer_ratio < 1
    assert stats.depth_counts.sum(1).tolist() == [3] * STEPS
    pipe.scheduler = pipe.scheduler.scheduler
    disable_early_exit(pipe)
    torch.testing.assert_close(run(pipe), ref, rtol=0, atol=0)


def test_wrapper_reads_through_to_the_scheduler(tiny_dit):
    pipe = tiny_pipe(tiny_dit)
    inner = pipe.scheduler
    early = enable_early_exit(pipe, None, FullDepth())
    wrapped = ExitAwareScheduler(inner, early)
    assert wrapped.config is inner.config and wrapped.init_noise_sigma == inner.init_noise_sigma
    assert inspect.signature(wrapped.step) == inspect.signature(inner.step)
    assert "eta" in inspect.signature(wrapped.step).parameters
    assert inspect.signature(wrapped.set_timesteps) == inspect.signature(inner.set_timesteps)
    with pytest.raises(ValueError, match="already exit-aware"):
        ExitAwareScheduler(wrapped, early)
    with pytest.raises(ValueError, match="EarlyExit"):
        ExitAwareScheduler(inner, None)
    with pytest.raises(ValueError, match="diffusers scheduler"):
        ExitAwareScheduler(object(), early)
    with pytest.raises(ValueError, match="no steps were recorded"):
        wrapped.statistics.layer_ratio


def test_begin_index_moves_progress_to_the_tail(tiny_dit):
    pipe = tiny_pipe(tiny_dit, DPMSolverMultistepScheduler)
    early = enable_early_exit(pipe, None, FullDepth())
    wrapped = ExitAwareScheduler(pipe.scheduler, early)
    wrapped.set_timesteps(5)
    assert early.progress == 0.0
    wrapped.set_begin_index(2)
    assert early.progress == 0.5
    assert not hasattr(ExitAwareScheduler(DDIMScheduler(), early), "set_begin_index")  # none where DDIM has none


def test_a_pipeline_saved_with_the_wrapper_in_place_loads_back(tiny_dit, tmp_path):
    """save_pretrained records the scheduler the wrapper holds; from_pretrained gives that scheduler back, and the
    reloaded pipeline samples what the original does at full depth."""
    pipe = tiny_pipe(tiny_dit)
    reference = run(pipe)
    pipe.scheduler = ExitAwareScheduler(pipe.scheduler, enable_early_exit(pipe, None, FullDepth()))
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler" / "scheduler_config.json").is_file()
    loaded = DiTPipeline.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert type(loaded.scheduler) is DDIMScheduler
    assert public(loaded.scheduler.config) == public(pipe.scheduler.scheduler.config)
    loaded.set_progress_bar_config(disable=True)
    assert torch.allclose(run(loaded), reference, atol=1e-5)
