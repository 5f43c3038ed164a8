"""`diffexit calibrate uem`: the search, its monotonicity in the budget, held-out error, the file, the rule."""

import json

import pytest
import torch
from diffusers import DDIMScheduler

from diffexit.app.cli import main as cli_main
from diffexit.uem import enable_early_exit
from diffexit.app.calibrate_uem import main
from diffexit.uem.calibration import ExitRecord, calibrate, exit_outcome, exit_path, record_exits, within_budget
from diffexit.uem.calibration_file import Calibration, calibration_path, calibrations_in, find_calibration
from diffexit.uem.exit_rules import CalibratedThreshold, MinDepth, UncertaintyThreshold
from diffexit.uem.digits.pipeline import DigitsDiTPipeline

BLOCKS = 4


def synthetic_record(n, steps=3, blocks=6, seed=0):
    """Exit errors that fall with depth at a per-sample, per-step rate; the uncertainty ranks them with noise."""
    g = torch.Generator().manual_seed(seed)
    difficulty = torch.rand(steps, 1, n, generator=g)
    remaining = torch.linspace(1, 0, blocks)[None, :, None]  # 0 at the last block
    scale = torch.linspace(0.5, 2.0, steps)[:, None, None]  # later steps cost more per block
    error = difficulty * remaining**2 * scale * (0.5 + torch.rand(steps, blocks, n, generator=g))
    error[:, -1] = 0
    uncertainty = torch.tanh(error * torch.exp(0.5 * torch.randn(steps, blocks, n, generator=g)))
    return ExitRecord(uncertainty, error)


def test_exit_outcome_stops_at_the_first_allowed_block_under_the_threshold():
    u = torch.tensor([[0.1, 0.9, 0.9], [0.9, 0.2, 0.9], [0.3, 0.3, 0.9]])  # [L = 3, n = 3]
    err = torch.tensor([[5.0, 6.0, 7.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    depth, e = exit_outcome(u, err, 1, 0.25)
    assert depth.tolist() == [1, 2, 3] and e.tolist() == [5.0, 2.0, 0.0]
    depth, e = exit_outcome(u, err, 2, 0.25)
    assert depth.tolist() == [3, 2, 3] and e.tolist() == [0.0, 2.0, 0.0]
    assert exit_outcome(u, err, 1, 0.1)[0].tolist() == [3, 3, 3]  # strict: u == tau does not stop


@pytest.mark.parametrize("min_depth", [None, 1, 3])
def test_the_path_runs_from_full_depth_and_only_ever_loosens(min_depth):
    record = synthetic_record(200)
    path = exit_path(record.uncertainty[1], record.error[1], min_depth)
    assert path[0].error == 0 and path[0].depth == 6
    assert path[-1].depth == (min_depth or 1)  # it ends with every sample stopping as early as allowed
    for a, b in zip(path, path[1:]):
        assert b.min_depth <= a.min_depth and b.threshold >= a.threshold and b.depth <= a.depth
    if min_depth is not None:
        assert {p.min_depth for p in path} == {min_depth}
    else:
        assert path[-1].min_depth == 1


def test_a_larger_budget_never_runs_more_blocks():
    record = synthetic_record(300)
    budgets = [0.002, 0.01, 0.03, 0.1, 0.3, 1.0]
    results = calibrate(record, budgets)
    ratios = [r["figures"]["calibration"]["layer_ratio"] for r in results]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] > ratios[-1]
    for small, large in zip(results, results[1:]):
        assert all(b >= a for a, b in zip(small["thresholds"], large["thresholds"]))
        assert all(b <= a for a, b in zip(small["min_depths"], large["min_depths"]))
        # Per sample, on fresh data too: each rule of the larger budget stops no later.
        fresh = synthetic_record(100, seed=7)
        for s in range(3):
            d_small = exit_outcome(fresh.uncertainty[s], fresh.error[s], small["min_depths"][s],
                                   small["thresholds"][s])[0]
            d_large = exit_outcome(fresh.uncertainty[s], fresh.error[s], large["min_depths"][s],
                                   large["thresholds"][s])[0]
            assert (d_large <= d_small).all()


@pytest.mark.parametrize("min_depth", [None, 1])
def test_the_budget_holds_on_calibration_data_and_on_held_out_data(min_depth):
    """The mean exit error of the chosen rules is within the budget at every step on the calibration samples, and
    within 15% of the budget on held-out samples (400 calibration samples; held-out 4000, so its own sampling error
    is small)."""
    record, held_out = synthetic_record(400, seed=1), synthetic_record(4000, seed=2)
    for r in calibrate(record, [0.01, 0.03, 0.1], min_depth, held_out):
        assert r["figures"]["calibration"]["max_error"] <= r["budget"]
        assert r["figures"]["held_out"]["max_error"] <= 1.15 * r["budget"]
        assert r["figures"]["held_out"]["layer_ratio"] < 1  # it does exit


def test_a_calibrated_minimum_depth_skips_a_falsely_confident_block():
    record = synthetic_record(400)
    record.uncertainty[:, 0] = 0.01  # block 1 claims certainty for every sample ...
    record.error[:, 0] = 1.0  # ... and is far off
    auto, fixed = calibrate(record, [0.05]), calibrate(record, [0.05], min_depth=1)
    assert min(auto[0]["min_depths"]) >= 2
    # Without a minimum, no threshold may pass 0.01, where block 1 would stop everyone.
    assert max(fixed[0]["thresholds"]) <= 0.01 and max(auto[0]["thresholds"]) > 0.01
    ratio = {name: r[0]["figures"]["calibration"]["layer_ratio"] for name, r in (("auto", auto), ("fixed", fixed))}
    assert ratio["auto"] < ratio["fixed"] - 0.1


def test_within_budget_stops_before_the_first_crossing():
    record = synthetic_record(100)
    path = exit_path(record.uncertainty[0], record.error[0])
    crossing = next(i for i, p in enumerate(path) if p.error > 0.05)
    assert within_budget(path, 0.05) == path[crossing - 1]
    assert within_budget(path, 1e-12).error <= 1e-12


def test_calibrated_threshold_applies_per_step_thresholds_and_minimum_depths():
    rule = CalibratedThreshold([0.5, 0.2, 0.0], [1, 3, 1], budget=0.01)
    u = lambda: torch.tensor([0.1, 0.3, 0.6])  # noqa: E731
    assert rule.exits(1, 0.0, u).tolist() == [True, True, False]
    assert rule.exits(2, 0.5, u) is False  # below step 1's minimum depth
    assert rule.exits(3, 0.5, u).tolist() == [True, False, False]
    assert rule.exits(1, 1.0, u).tolist() == [False, False, False]  # threshold 0 never fires
    assert "budget=0.01" in repr(rule)
    with pytest.raises(ValueError, match="ExitAwareScheduler"):
        rule.exits(1, None, u)
    with pytest.raises(ValueError, match="exceeds"):
        rule.check(2)
    with pytest.raises(ValueError, match="one of each per step"):
        CalibratedThreshold([0.1, 0.2], [1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        CalibratedThreshold([1.5])
    with pytest.raises(ValueError, match="minimum depths must be ints"):
        CalibratedThreshold([0.1], [0])
    with pytest.raises(ValueError, match="UncertaintyThreshold"):
        CalibratedThreshold(0.5)
    assert CalibratedThreshold([0.5]).exits(1, None, u).tolist() == [True, True, False]  # one step: no progress needed


def test_min_depth_can_vary_per_step():
    rule = MinDepth(UncertaintyThreshold(0.5), [4, 2])
    u = lambda: torch.tensor([0.1])  # noqa: E731
    assert rule.exits(3, 0.0, u) is False and rule.exits(4, 0.0, u).tolist() == [True]
    assert rule.exits(2, 1.0, u).tolist() == [True]
    with pytest.raises(ValueError, match="ExitAwareScheduler"):
        rule.exits(3, None, u)
    with pytest.raises(ValueError, match="exceeds"):
        rule.check(3)


# End to end on a tiny random DiT.

def ddim():
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                         timestep_spacing="trailing")


@pytest.fixture(scope="module")
def tiny(tiny_dit, tmp_path_factory, spread_uem):
    root = tmp_path_factory.mktemp("tiny")
    model = tiny_dit(layers=BLOCKS)
    DigitsDiTPipeline(transformer=model, scheduler=ddim()).save_pretrained(root / "pipe")
    uem = spread_uem(model, target="exit-cost")
    uem.save_pretrained(root / "uem")
    return root, model, uem


def test_the_rule_decides_as_the_recording_predicts(tiny):
    """At the first step the early-exit forward sees the recorded input, so its depths are those the calibration
    computed from the recording for the same rule."""
    _, model, uem = tiny
    labels = torch.arange(6) % 10
    record = record_exits(model, uem, ddim(), labels, steps=3, guidance_scale=2.0, seed=5)
    assert record.uncertainty.shape == record.error.shape == (3, BLOCKS, 6)
    assert record.error[:, -1].abs().max() == 0 and record.error[:, 0].min() > 0
    threshold = float(record.uncertainty[0, :-1].median())
    want, _ = exit_outcome(record.uncertainty[0], record.error[0], 1, threshold)
    assert 1 < len(set(want.tolist()))  # the test distinguishes samples
    pipe = DigitsDiTPipeline(transformer=model, scheduler=ddim())
    pipe.set_progress_bar_config(disable=True)
    early = enable_early_exit(pipe, uem, CalibratedThreshold([threshold, 0.0, 0.0]))
    depths = []
    early.progress = 0.0
    early.depth_listener = depths.append
    pipe(labels.tolist(), guidance_scale=2.0, generator=torch.Generator().manual_seed(5), num_inference_steps=1,
         output_type="pt")
    assert depths[0].tolist() == want.tolist()


def test_calibrate_writes_files_that_round_trip_and_refuse_other_weights(tiny_dit, tiny, tmp_path, capsys, spread_uem):
    root, model, uem = tiny
    argv = ["calibrate", "uem", "--uem", str(root / "uem"), "--model", str(root / "pipe"), "--budget", "0.02",
            "0.002", "--min-depth", "auto", "2", "--steps", "3", "--samples", "10", "--held-out", "10",
            "--out", str(tmp_path)]
    assert cli_main(argv) == 0
    assert "| 2 | 0.002 |" in capsys.readouterr().out
    files = {(c.provenance["min_depth"], c.budget): path
             for path in calibrations_in(tmp_path) for c in [Calibration.load(path)]}
    assert list(files) == [("auto", 0.002), ("auto", 0.02), (2, 0.002), (2, 0.02)]
    # Made for 3 steps, not the 25 a bare budget means: the step count is in the name.
    assert files[2, 0.02] == calibration_path(tmp_path, 0.02, 2, 3) == tmp_path / "calibration-0.02-min2-steps3.json"
    assert files["auto", 0.02].name == "calibration-0.02-steps3.json"
    assert find_calibration(tmp_path, 0.02, steps=3) == files["auto", 0.02]
    with pytest.raises(FileNotFoundError, match="--budget 0.02 --steps 8`"):
        find_calibration(tmp_path, 0.02, steps=8)
    assert set(Calibration.load(files[2, 0.02]).min_depths) == {2}
    files = {budget: path for (mode, budget), path in files.items() if mode == "auto"}

    loaded = Calibration.load(files[0.02])
    data = json.loads(files[0.02].read_text())
    assert loaded.thresholds == data["thresholds"] and loaded.min_depths == data["min_depths"]
    assert loaded.uem["target"] == "exit-cost" and loaded.sampler["steps"] == 3
    assert loaded.provenance["command"].startswith("diffexit calibrate uem")
    loaded.save(tmp_path / "again.json")
    assert Calibration.load(tmp_path / "again.json") == loaded
    small = Calibration.load(files[0.002])
    assert sum(small.rule().min_depths) >= sum(loaded.rule().min_depths)

    rule = Calibration.load(files[0.02]).matched_rule(model, uem)
    assert rule.thresholds == tuple(loaded.thresholds) and rule.budget == 0.02
    assert Calibration.load(files[0.02]).matched_rule(model.half().float(), uem).budget == 0.02  # fp16 round trip

    with pytest.raises(ValueError, match="3 blocks"):
        Calibration.load(files[0.02]).matched_rule(tiny_dit(layers=3), uem)
    with pytest.raises(ValueError, match="model's weights differ"):
        Calibration.load(files[0.02]).matched_rule(tiny_dit(seed=9, layers=BLOCKS), uem)
    with pytest.raises(ValueError, match="UEM weights differ"):
        Calibration.load(files[0.02]).matched_rule(model, spread_uem(model, seed=2, target="exit-cost"))
    with pytest.raises(ValueError, match="trained on 'paper'"):
        Calibration.load(files[0.02]).matched_rule(model, spread_uem(model, target="paper"))
    (tmp_path / "other.json").write_text(json.dumps({"sched": {}}))
    with pytest.raises(ValueError, match="not a UEM calibration file"):
        Calibration.load(tmp_path / "other.json")


@pytest.mark.parametrize("extra, message", [
    (["--budget", "0"], "--budget must be > 0"),
    (["--budget", "0.1", "--min-depth", "deep"], "--min-depth must be 'auto'"),
    (["--budget", "0.1", "--min-depth", "9"], "exceeds the model's 4 blocks"),
    (["--budget", "0.1", "--samples", "0"], "--samples must be >= 1"),
])
def test_bad_arguments_are_refused(tiny, capsys, extra, message):
    root, _, _ = tiny
    with pytest.raises(SystemExit):
        main(["--uem", str(root / "uem"), "--model", str(root / "pipe"), *extra])
    assert message in capsys.readouterr().err


def test_menus_list_the_default_step_count_first():
    """A menu opening on the first calibration must be able to run it at the default 25 steps; the exit-trained
    heads also ship 8-, 10- and 12-step files, which sort after the 25-step ones."""
    from diffexit.uem.calibration_file import CALIBRATION_STEPS, calibration_label
    from diffexit.uem.digits.embedded import embedded_uem_dir

    paths = calibrations_in(embedded_uem_dir(exit_trained=True))
    steps = [Calibration.load(p).sampler["steps"] for p in paths]
    assert steps[0] == CALIBRATION_STEPS and sorted(steps, key=lambda s: (s != CALIBRATION_STEPS, s)) == steps
    assert len(set(steps)) == 4
    assert calibration_label(paths[0]) == "0.01"
