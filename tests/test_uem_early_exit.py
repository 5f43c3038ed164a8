"""Early exits on a tiny random DiTTransformer2DModel: equivalences, compaction, guided pairs, errors."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel, UNet2DModel

from diffexit.samplers import ThresholdSchedule
from diffexit.uem import (
    CalibratedThreshold,
    FullDepth,
    MinDepth,
    StaticDepth,
    UEMStack,
    UncertaintyThreshold,
    disable_early_exit,
    enable_early_exit,
    exit_predictions,
)

LAYERS = 4
NULL_CLASS = 1000


def inputs(batch, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return x, t, y


def prefix_and_head(m, x, t, y, k):
    """pos_embed -> blocks[:k] -> DiT's output head, written out from the diffusers source."""
    p, c = m.config.patch_size, m.out_channels
    h = m.pos_embed(x)
    for block in m.transformer_blocks[:k]:
        h = block(h, timestep=t, class_labels=y)
    cond = m.transformer_blocks[0].norm1.emb(t, y, hidden_dtype=h.dtype)
    shift, scale = m.proj_out_1(F.silu(cond)).chunk(2, dim=1)
    h = m.proj_out_2(m.norm_out(h) * (1 + scale[:, None]) + shift[:, None])
    n = x.shape[-1] // p
    h = torch.einsum("nhwpqc->nchpwq", h.reshape(-1, n, n, p, p, c))
    return h.reshape(-1, c, n * p, n * p)


def expected_depths(mean_u, tau):
    """First block (1-based) whose mean uncertainty is below tau, per column of mean_u [L, G]; L if none."""
    layers = mean_u.shape[0]
    below = mean_u[:-1] < tau
    first = torch.where(below.any(0), below.int().argmax(0) + 1, torch.full_like(below[0], layers, dtype=torch.long))
    return first.long()


def spreading_tau(mean_u):
    """The threshold, half-way between two neighbouring observed values (robust to float noise), that gives the
    most distinct exit depths."""
    v = mean_u[:-1].flatten().sort().values
    candidates = [float((a + b) / 2) for a, b in zip(v[:-1], v[1:])]
    return max(candidates, key=lambda tau: len(set(expected_depths(mean_u, tau).tolist())))


@torch.no_grad()
def test_threshold_that_never_fires_equals_original_forward(tiny_dit, spread_uem):
    m = tiny_dit(layers=LAYERS)
    x, t, y = inputs(5)
    ref = m(x, timestep=t, class_labels=y).sample
    early = enable_early_exit(m, spread_uem(m), UncertaintyThreshold(0.0))
    out = m(x, timestep=t, class_labels=y).sample
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert early.last_depths.tolist() == [LAYERS] * 5
    tup = m(x, timestep=t, class_labels=y, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], out)


def test_a_step_where_nothing_can_exit_is_the_models_own_forward(tiny_dit, monkeypatch, spread_uem):
    # No per-block bookkeeping when the rule cannot fire: the output is bit-identical to no hook, the UEMs are
    # never evaluated, and the depths are still reported (guided pairs counted once).
    import diffexit.uem.early_exit as early_exit_module

    m = tiny_dit(layers=LAYERS)
    x, t, y = inputs(3)
    x, t, y = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL_CLASS)])
    with torch.no_grad():
        ref = m(x, timestep=t, class_labels=y).sample
    monkeypatch.setattr(early_exit_module, "token_uncertainty", lambda *a: pytest.fail("the UEMs were evaluated"))
    for rule in (UncertaintyThreshold(0.0), FullDepth(), MinDepth(UncertaintyThreshold(0.5), LAYERS),
                 StaticDepth((LAYERS,))):
        early = enable_early_exit(m, spread_uem(m), rule)
        with torch.no_grad():
            out = m(x, timestep=t, class_labels=y).sample
        disable_early_exit(m)
        assert torch.equal(out, ref), rule
        assert early.last_depths.tolist() == [LAYERS] * 3


def test_the_rule_is_not_asked_before_its_first_exit(tiny_dit, spread_uem):
    m = tiny_dit(layers=LAYERS)
    x, t, y = inputs(2)
    asked = []

    class Recording(UncertaintyThreshold):
        def exits(self, depth, progress, uncertainty):
            asked.append(depth)
            return super().exits(depth, progress, uncertainty)

    enable_early_exit(m, spread_uem(m), MinDepth(Recording(1e-9), 3))
    with torch.no_grad():
        m(x, timestep=t, class_labels=y)
    assert asked == [3]  # blocks 1 and 2 run without asking; after block 4 every sample stops anyway


@pytest.mark.parametrize("rule, progress, first", [
    (UncertaintyThreshold(0.3), 0.5, 1), (UncertaintyThreshold(0.0), 0.5, LAYERS),
    (UncertaintyThreshold(ThresholdSchedule("linear", 0.5, 0.0)), 1.0, LAYERS),
    (StaticDepth((1, 3)), 0.9, 3), (MinDepth(UncertaintyThreshold(0.3), (2, 3)), 0.2, 2),
    (MinDepth(UncertaintyThreshold(0.0), 2), 0.2, LAYERS), (FullDepth(), None, LAYERS),
    (CalibratedThreshold([0.0, 0.2], [1, 3]), 0.0, LAYERS), (CalibratedThreshold([0.0, 0.2], [1, 3]), 1.0, 3),
])
def test_first_exit_per_rule(rule, progress, first):
    assert rule.first_exit(progress, LAYERS) == first


@torch.no_grad()
def test_scalar_timestep_is_broadcast_like_the_model_does(tiny_dit):
    m = tiny_dit(layers=LAYERS)
    x, _, y = inputs(3)
    t = torch.tensor([417])
    ref = m(x, timestep=t, class_labels=y).sample
    enable_early_exit(m, None, FullDepth())
    torch.testing.assert_close(m(x, timestep=t, class_labels=y).sample, ref, rtol=0, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("k", range(1, LAYERS + 1))
def test_exit_after_block_k_is_prefix_plus_own_head(tiny_dit, k, spread_uem):
    m = tiny_dit(layers=LAYERS)
    x, t, y = inputs(3)
    want = prefix_and_head(m, x, t, y, k)
    early = enable_early_exit(m, None, StaticDepth([k]))
    got = m(x, timestep=t, class_labels=y).sample
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert early.last_depths.tolist() == [k] * 3
    assert torch.equal(exit_predictions(m, spread_uem(m), x, timestep=t, class_labels=y).sample[k - 1], got)


@torch.no_grad()
def test_compacted_batch_equals_each_sample_run_alone(tiny_dit, spread_uem):
    m = tiny_dit(layers=LAYERS)
    uem = spread_uem(m)
    x, t, y = inputs(6)
    mean_u = exit_predictions(m, uem, x, timestep=t, class_labels=y).uncertainty.mean(-1)
    tau = spreading_tau(mean_u)
    want_depths = expected_depths(mean_u, tau)
    assert len(set(want_depths.tolist())) >= 3, "the check needs samples that exit at different blocks"
    early = enable_early_exit(m, uem, tau, cfg=False)
    batched = m(x, timestep=t, class_labels=y).sample
    assert early.last_depths.tolist() == want_depths.tolist()
    for i in range(6):
        alone = m(x[i : i + 1], timestep=t[i : i + 1], class_labels=y[i : i + 1]).sample
        assert early.last_depths.tolist() == [want_depths[i].item()]
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(alone, prefix_and_head(m, x[i : i + 1], t[i : i + 1], y[i : i + 1], want_depths[i]))


@torch.no_grad()
def test_guided_pairs_exit_together_on_the_more_uncertain_row(tiny_dit, spread_uem):
    m = tiny_dit(layers=LAYERS)
    uem = spread_uem(m)
    x, t, y = inputs(4)
    xx, tt, yy = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL_CLASS)])
    mean_u = exit_predictions(m, uem, xx, timestep=tt, class_labels=yy).uncertainty.mean(-1)
    pair_u = torch.maximum(mean_u[:, :4], mean_u[:, 4:])
    tau = spreading_tau(pair_u)
    want = expected_depths(pair_u, tau)
    rowwise = expected_depths(mean_u, tau)
    assert not torch.equal(rowwise[:4], rowwise[4:]), "the check needs pairs whose rows alone would split"
    early = enable_early_exit(m, uem, tau)
    out = m(xx, timestep=tt, class_labels=yy).sample
    assert early.last_depths.tolist() == want.tolist()
    for i in range(4):
        rows = torch.tensor([i, i + 4])
        alone = m(xx[rows], timestep=tt[rows], class_labels=yy[rows]).sample
        assert early.last_depths.tolist() == [want[i].item()]
        torch.testing.assert_close(out[rows], alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(alone, prefix_and_head(m, xx[rows], tt[rows], yy[rows], want[i]))
    early.cfg = False
    m(xx, timestep=tt, class_labels=yy)
    assert early.last_depths.tolist() == rowwise.tolist()


def test_cfg_true_needs_an_even_batch(tiny_dit):
    m = tiny_dit(layers=LAYERS)
    enable_early_exit(m, None, FullDepth(), cfg=True)
    x, t, y = inputs(3)
    with pytest.raises(ValueError, match="odd batch"):
        m(x, timestep=t, class_labels=y)


@torch.no_grad()
def test_disable_restores_the_original_model_exactly(tiny_dit, spread_uem):
    m = tiny_dit(layers=LAYERS)
    x, t, y = inputs(3)
    ref = m(x, timestep=t, class_labels=y).sample
    state = {k: v.clone() for k, v in m.state_dict().items()}
    pipe = SimpleNamespace(transformer=m)
    enable_early_exit(pipe, spread_uem(m), 0.99)
    assert not torch.allclose(m(x, timestep=t, class_labels=y).sample, ref)
    disable_early_exit(pipe)
    assert "forward" not in vars(m) and not hasattr(m, "_diffusers_hook")
    assert m.forward.__func__ is DiTTransformer2DModel.forward
    assert m.state_dict().keys() == state.keys() and all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(m(x, timestep=t, class_labels=y).sample, ref)
    enable_early_exit(m, None, FullDepth())  # and it can be enabled again


def test_signature_seen_by_pipelines_is_the_original(tiny_dit):
    import inspect

    m = tiny_dit(layers=LAYERS)
    before = inspect.signature(m.forward)
    enable_early_exit(m, None, FullDepth())
    assert inspect.signature(m.forward) == before


@torch.no_grad()
def test_threshold_schedule_follows_progress(tiny_dit, spread_uem):
    m = tiny_dit(layers=LAYERS)
    uem = spread_uem(m)
    x, t, y = inputs(4)
    mean_u = exit_predictions(m, uem, x, timestep=t, class_labels=y).uncertainty.mean(-1)
    low, high = float(mean_u.min()) - 1e-3, float(mean_u.max()) + 1e-3
    assert 0 <= low and high <= 1, "the check needs uncertainties away from 0 and 1"
    early = enable_early_exit(m, uem, ThresholdSchedule("linear", high, low), cfg=False)
    with pytest.raises(ValueError, match="progress"):
        m(x, timestep=t, class_labels=y)
    early.progress = 0.0
    m(x, timestep=t, class_labels=y)
    assert early.last_depths.tolist() == [1] * 4
    early.progress = 1.0
    m(x, timestep=t, class_labels=y)
    assert early.last_depths.tolist() == [LAYERS] * 4


@torch.no_grad()
def test_min_depth_holds_samples_back(tiny_dit, spread_uem):
    m = tiny_dit(layers=LAYERS)
    x, t, y = inputs(3)
    early = enable_early_exit(m, spread_uem(m), MinDepth(UncertaintyThreshold(1.0), 3))
    out = m(x, timestep=t, class_labels=y).sample
    assert early.last_depths.tolist() == [3] * 3
    torch.testing.assert_close(out, prefix_and_head(m, x, t, y, 3), rtol=0, atol=1e-5)


def test_static_depth_per_stretch_of_progress(tiny_dit):
    m = tiny_dit(layers=LAYERS)
    x, t, y = inputs(2)
    early = enable_early_exit(m, None, StaticDepth((1, 2, 4)))
    for p, d in ((0.0, 1), (0.34, 2), (0.7, 4), (1.0, 4)):
        early.progress = p
        with torch.no_grad():
            m(x, timestep=t, class_labels=y)
        assert early.last_depths.tolist() == [d, d]


def test_frozen_backbone_gets_no_gradient(tiny_dit, spread_uem):
    m = tiny_dit(layers=LAYERS)
    uem = spread_uem(m)
    x, t, y = inputs(2)
    pred = exit_predictions(m, uem, x, timestep=t, class_labels=y, backbone_grad=False)
    (pred.uncertainty.sum() + pred.sample.sum()).backward()
    assert all(p.grad is None for p in m.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in uem.parameters())
    uem.zero_grad()
    exit_predictions(m, uem, x, timestep=t, class_labels=y).sample.sum().backward()
    assert any(p.grad is not None for p in m.parameters())


# --- errors ---------------------------------------------------------------------------------------------------


def test_enabling_twice_is_refused(tiny_dit):
    m = tiny_dit(layers=LAYERS)
    enable_early_exit(m, None, FullDepth())
    with pytest.raises(ValueError, match="already enabled"):
        enable_early_exit(m, None, FullDepth())


def test_disable_without_enable_is_refused(tiny_dit):
    with pytest.raises(ValueError, match="not enabled"):
        disable_early_exit(tiny_dit(layers=LAYERS))


def test_unsupported_model_names_the_supported_ones():
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=8)
    with pytest.raises(ValueError) as err:
        enable_early_exit(unet, None, FullDepth())
    for name in ("DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel", "UNet2DModel"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="pipeline with a `transformer`"):
        enable_early_exit(object(), None, FullDepth())


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), True, "0.5", ThresholdSchedule("linear", 1.2, 0.1)])
def test_threshold_outside_unit_interval_is_refused(tiny_dit, bad, spread_uem):
    with pytest.raises(ValueError, match=r"threshold"):
        enable_early_exit(tiny_dit(layers=LAYERS), spread_uem(tiny_dit(layers=LAYERS)), bad)


def test_depth_schedule_longer_than_the_model_is_refused(tiny_dit, spread_uem):
    m = tiny_dit(layers=LAYERS)
    with pytest.raises(ValueError, match="only 4"):
        enable_early_exit(m, None, StaticDepth((2, 4, 6)))
    with pytest.raises(ValueError, match="exceeds"):
        enable_early_exit(m, spread_uem(m), MinDepth(UncertaintyThreshold(0.5), 5))
    assert not hasattr(m, "_diffusers_hook")


def test_uems_of_another_model_are_refused(tiny_dit):
    m = tiny_dit(layers=LAYERS)
    with pytest.raises(ValueError, match="built for a DiTTransformer2DModel with 6 blocks"):
        enable_early_exit(m, UEMStack.for_model(tiny_dit(layers=6)), 0.5)
    with pytest.raises(ValueError, match="reads the UEMs"):
        enable_early_exit(m, None, 0.5)
    with pytest.raises(ValueError, match="UEMStack"):
        enable_early_exit(m, torch.nn.Linear(2, 2), 0.5)


def test_bad_cfg_value_is_refused(tiny_dit):
    with pytest.raises(ValueError, match="cfg"):
        enable_early_exit(tiny_dit(layers=LAYERS), None, FullDepth(), cfg="yes")
