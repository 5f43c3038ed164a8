"""Exits with a cached remainder: refreshed at every step it is full depth, bit for bit; without refresh (and with
first-order extrapolation) it matches a per-sample re-derivation written from the diffusers DiT source."""

import pytest
import torch
import torch.nn.functional as F

from diffexit.samplers import progress
from diffexit.samplers.early_exits import attach_early_exits
from diffexit.uem import enable_early_exit
from diffexit.uem.cached_remainder import EXIT, MAX_CALLS_PER_STEP, REFRESH, SKIP, CachedRemainder
from diffexit.uem.exit_config import EarlyExitConfig
from diffexit.uem.exit_rules import ExitRule

LAYERS = 4


class PlannedDepths(ExitRule):
    """Sample ``g`` stops after ``plan[step][g]`` blocks; the step is read off the progress of ``steps`` steps."""

    needs_uem = False

    def __init__(self, plan, steps):
        self.plan, self.steps = plan, steps

    def exits(self, depth, progress, uncertainty):
        # Asked at every depth, for the samples still running: those planned to stop here or deeper.
        planned = torch.tensor(self.plan[round(progress * (self.steps - 1))])
        return planned[planned >= depth] == depth


def head(m, h, t, y):
    """DiT's output head on tokens ``h``, written out from the diffusers source."""
    p, c = m.config.patch_size, m.out_channels
    cond = m.transformer_blocks[0].norm1.emb(t, y, hidden_dtype=h.dtype)
    shift, scale = m.proj_out_1(F.silu(cond)).chunk(2, dim=1)
    h = m.proj_out_2(m.norm_out(h) * (1 + scale[:, None]) + shift[:, None])
    n = int(h.shape[1] ** 0.5)
    return torch.einsum("nhwpqc->nchpwq", h.reshape(-1, n, n, p, p, c)).reshape(-1, c, n * p, n * p)


def rederived(m, xs, t, y, plan, order):
    """Each sample alone: blocks it runs record ``(step, residual)``; an exit after ``k`` adds, per skipped block,
    the last residual (order 0) or its linear extrapolation from the last two (order 1); a step of depth 0 hands the
    head the state it read last (or its extrapolation from the last two such states)."""

    def guess(history, s):
        (a, va) = history[-1]
        if order == 1 and len(history) > 1:
            (b, vb) = history[-2]
            return va + (s - a) * (va - vb) / (a - b)
        return va

    outs = [torch.empty(x.shape[0], m.out_channels, *x.shape[2:]) for x in xs]
    for g in range(xs[0].shape[0]):
        history, states = {j: [] for j in range(LAYERS)}, []
        for s, x in enumerate(xs):
            k = plan[s][g]
            tg, yg = t[g : g + 1], y[g : g + 1]
            if k == 0:
                outs[s][g] = head(m, guess(states, s), tg, yg)[0]
                continue
            h = m.pos_embed(x[g : g + 1])
            for j in range(k):
                nxt = m.transformer_blocks[j](h, timestep=tg, class_labels=yg)
                history[j].append((s, nxt - h))
                h = nxt
            for j in range(k, LAYERS):
                if history[j]:
                    h = h + guess(history[j], s)
            states.append((s, h))
            outs[s][g] = head(m, h, tg, yg)[0]
    return outs


def run_steps(m, early, xs, t, y):
    outs = []
    for s, x in enumerate(xs):
        early.progress = progress(s, len(xs))
        outs.append(m(x, timestep=t, class_labels=y).sample)
    return outs


# Step 0 is the cache's own refresh; later steps exit each sample at its own depth, some deep, some not at all.
PLAN = [[4, 4, 4], [1, 3, 4], [2, 1, 3], [1, 2, 1], [3, 1, 2]]
# With exit_every=2 the rule runs at steps 2 and 4 only; steps 1 and 3 run no block (depth 0).
SKIPPING = [[4, 4, 4], [0, 0, 0], [2, 1, 3], [0, 0, 0], [3, 1, 2]]
# With refresh_first=0 the rule decides the first step too: blocks that have not yet run a sample add nothing.
NO_REFRESH = [[2, 1, 3], [1, 3, 4], [4, 2, 4], [1, 2, 1], [3, 1, 2]]


@torch.no_grad()
@pytest.mark.parametrize("order, exit_every, first, plan", [
    (0, None, 1, PLAN), (1, None, 1, PLAN), (0, 2, 1, SKIPPING), (1, 2, 1, SKIPPING), (1, None, 0, NO_REFRESH)])
def test_per_sample_remainder_matches_rederivation(order, exit_every, first, plan, perturbed_dit):
    m = perturbed_dit()
    g = torch.Generator().manual_seed(3)
    steps = len(plan)
    xs = [torch.randn(3, 1, 8, 8, generator=g) for _ in range(steps)]
    t, y = torch.tensor([900, 500, 100]), torch.tensor([1, 4, 7])
    early = enable_early_exit(m, None, PlannedDepths(plan, steps),
                              remainder=CachedRemainder(order, exit_every=exit_every, refresh_first=first))
    depths = []
    early.depth_listener = depths.append
    got = run_steps(m, early, xs, t, y)
    assert [d.tolist() for d in depths] == plan
    want = rederived(m, xs, t, y, plan, order)
    for s in range(steps):
        torch.testing.assert_close(got[s], want[s], rtol=1e-5, atol=1e-5, msg=f"step {s}")
    # Without a remainder the same exits differ: the remainder is what is being checked.
    if exit_every is None and first == 1:
        early.remainder = None
        plain = run_steps(m, early, xs, t, y)
        assert not torch.allclose(plain[1], want[1], atol=1e-3)


@torch.no_grad()
def test_refresh_steps_run_full_depth_and_the_rest_exit(perturbed_dit):
    m = perturbed_dit()
    g = torch.Generator().manual_seed(4)
    steps = 7
    xs = [torch.randn(2, 1, 8, 8, generator=g) for _ in range(steps)]
    t, y = torch.tensor([700, 300]), torch.tensor([2, 5])
    plan = [[1, 2]] * steps
    early = enable_early_exit(m, None, PlannedDepths(plan, steps),
                              remainder=CachedRemainder(0, refresh_every=3, refresh_last=2, refresh_first=2))
    depths = []
    for s, x in enumerate(xs):
        early.progress = progress(s, steps)
        m(x, timestep=t, class_labels=y)
        depths.append(early.last_depths.tolist())
    # Steps 0, 1 (the first two), 3 (every third) and 5, 6 (the last two) refresh at full depth.
    assert depths == [[4, 4], [4, 4], [1, 2], [4, 4], [1, 2], [4, 4], [4, 4]]


def digits_pipe(transformer):
    from diffexit.uem.digits.model import build_sampling_scheduler
    from diffexit.uem.digits.pipeline import DigitsDiTPipeline

    pipe = DigitsDiTPipeline(transformer=transformer, scheduler=build_sampling_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
@pytest.mark.parametrize("remainder", ["cached", "taylor"])
def test_refreshed_at_every_step_is_full_depth_exactly(remainder, perturbed_dit):
    def sample(pipe):
        return pipe([3, 8], generator=torch.Generator().manual_seed(0), num_inference_steps=4,
                    output_type="pt").images

    full = sample(digits_pipe(perturbed_dit()))
    pipe = digits_pipe(perturbed_dit())
    attached = attach_early_exits(pipe, EarlyExitConfig("static", depths=(1,), remainder=remainder,
                                                        refresh_every=1))
    assert torch.equal(sample(pipe), full)
    assert pipe.scheduler.statistics.layer_ratio == 1.0
    # The same exits refreshed only at the first step are cheaper and differ from full depth.
    attached.early_exit.remainder = CachedRemainder(0)
    assert not torch.equal(sample(pipe), full)
    assert pipe.scheduler.statistics.layer_ratio < 1.0


def test_a_new_run_starts_afresh():
    cache = CachedRemainder(0, refresh_every=None)
    assert [cache.begin(progress(s, 3), 4) for s in range(3)] == [REFRESH, EXIT, EXIT]
    # The same pipeline called again: progress falls back, so its first step refreshes again; so does a new batch.
    assert [cache.begin(0.0, 4), cache.begin(0.5, 4), cache.begin(1.0, 6)] == [REFRESH, EXIT, REFRESH]


def test_exit_every_computes_where_taylorseer_would():
    # TaylorSeer with cache_interval 5 after 1 warm-up step computes steps 0, 2 and 7 of 10.
    cache = CachedRemainder(1, exit_every=5)
    kinds = [cache.begin(progress(s, 10), 2) for s in range(10)]
    assert [s for s, k in enumerate(kinds) if k != SKIP] == [0, 2, 7]
    assert kinds[0] == REFRESH and kinds[2] == kinds[7] == EXIT


def test_remainder_needs_the_progress(perturbed_dit):
    m = perturbed_dit()
    enable_early_exit(m, None, PlannedDepths([[1]], 1), remainder=CachedRemainder(0))
    with pytest.raises(ValueError, match="ExitAwareScheduler"):
        m(torch.zeros(1, 1, 8, 8), timestep=torch.tensor([1]), class_labels=torch.tensor([1]))


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "static", "depths": (2,), "remainder": "lru"}, "choose one of"),
    ({"method": "static", "depths": (2,), "refresh_every": 2}, "set remainder to 'cached' or 'taylor'"),
    ({"method": "full", "remainder": "cached"}, "pick an exit method"),
    ({"method": "static", "depths": (2,), "remainder": "cached", "refresh_every": 0}, "refresh_every must be"),
    ({"method": "static", "depths": (2,), "remainder": "cached", "refresh_last": -1}, "refresh_last must be"),
    ({"method": "static", "depths": (2,), "remainder": "cached", "refresh_first": -1}, "refresh_first must be"),
    ({"method": "static", "depths": (2,), "remainder": "cached", "exit_every": 0}, "exit_every must be"),
    ({"method": "static", "depths": (2,), "exit_every": 2}, "set remainder to 'cached' or 'taylor'"),
])
def test_bad_remainder_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EarlyExitConfig(**kwargs)


def test_remainder_settings_round_trip():
    config = EarlyExitConfig("static", depths=(2,), remainder="taylor", refresh_every=3, refresh_last=1,
                             refresh_first=2, exit_every=4)
    assert EarlyExitConfig.from_dict(config.to_dict()) == config
    assert "remainder" not in EarlyExitConfig("static", depths=(2,)).to_dict()


def test_the_public_api_exports_the_remainder_and_similarity_exits():
    import diffexit.uem as uem
    from diffexit.uem import calibration, exit_rules

    assert uem.CachedRemainder is CachedRemainder and uem.SimilarityExit is exit_rules.SimilarityExit
    assert uem.calibrate_similarity is calibration.calibrate_similarity
    assert (uem.REFRESH, uem.EXIT, uem.SKIP) == (REFRESH, EXIT, SKIP)
    assert {"CachedRemainder", "SimilarityExit", "calibrate_similarity"} <= set(uem.__all__)


def test_each_call_of_a_step_has_its_own_slot_and_a_new_run_starts_every_slot_over():
    cache = CachedRemainder(order=0, refresh_every=None, refresh_first=1)
    rows = torch.arange(1)
    # Two calls a step (Flux's true CFG): each slot refreshes at its own first step and keeps its own residuals.
    for branch, value in enumerate((1.0, 2.0)):
        assert cache.begin(0.0, 1) == REFRESH and cache.step == 0
        cache.record(3, rows, torch.full((1, 2, 2), value))
    for branch, value in enumerate((1.0, 2.0)):
        assert cache.begin(0.5, 1) == EXIT and cache.step == 1
        assert torch.equal(cache.remainder(0, rows), torch.full((1, 2, 2), value)), branch
    # A lower progress is a new run: every slot starts over at its first step, with nothing kept.
    for _ in range(2):
        assert cache.begin(0.0, 1) == REFRESH and cache.step == 0
    cache.begin(0.5, 1)
    cache.begin(0.5, 1)
    assert cache.begin(0.5, 1) == REFRESH  # a third call at a step that had two is a slot of its own, new
    # One-step runs (every call at progress 0) reuse the slots past MAX_CALLS_PER_STEP instead of adding one each.
    for _ in range(3 * MAX_CALLS_PER_STEP):
        assert cache.begin(0.0, 1) == REFRESH
    assert len(cache._slots) == MAX_CALLS_PER_STEP
