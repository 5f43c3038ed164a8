"""One door for exits: ``EarlyExitConfig`` (checked once, round-trips through JSON) and ``attach_early_exits`` /
``detach_early_exits`` (detach leaves the pipeline bit-identical to one never attached)."""

import json
import math

import pytest
import torch

from diffexit.samplers import ExitAwareScheduler
from diffexit.samplers.early_exits import attach_early_exits, detach_early_exits
from diffexit.uem.exit_config import EarlyExitConfig

LAYERS = 4
STEPS = 3


def digits_pipe(transformer):
    from diffexit.uem.digits.model import build_sampling_scheduler
    from diffexit.uem.digits.pipeline import DigitsDiTPipeline

    pipe = DigitsDiTPipeline(transformer=transformer, scheduler=build_sampling_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_dit, spread_uem):
    """``(heads folder, run folder with a fine-tuned backbone beside its heads)``; the heads' uncertainties spread
    around 0.5, so a 0.5 threshold exits some samples early."""
    root = tmp_path_factory.mktemp("uem-folders")
    model = tiny_dit(layers=LAYERS)
    spread_uem(model).save_pretrained(root / "heads")
    spread_uem(model).save_pretrained(root / "run" / "uem")
    tiny_dit(layers=LAYERS, seed=7).save_pretrained(root / "run" / "transformer")
    return root / "heads", root / "run"


def sample(pipe, labels=(0, 3, 7)):
    generators = [torch.Generator().manual_seed(11 + i) for i in range(len(labels))]
    return pipe(list(labels), generator=generators, num_inference_steps=STEPS, output_type="pt").images


def pipeline_state(pipe):
    model = pipe.transformer
    return {"transformer": model, "scheduler": pipe.scheduler, "config": dict(pipe.config),
            "model_attrs": sorted(vars(model)), "pipe_attrs": sorted(vars(pipe)),
            "hooks": [len(getattr(m, name)) for m in model.modules()
                      for name in ("_forward_hooks", "_forward_pre_hooks")],
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


def assert_same_state(before, after):
    assert after["transformer"] is before["transformer"] and after["scheduler"] is before["scheduler"]
    assert {k: v for k, v in after.items() if k != "state"} == {k: v for k, v in before.items() if k != "state"}
    assert before["state"].keys() == after["state"].keys()
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])


# The config -------------------------------------------------------------------------------------------------------

ROUND_TRIPS = [
    EarlyExitConfig(),
    EarlyExitConfig("deediff", threshold=0.1, uem="heads"),
    EarlyExitConfig("deediff", threshold="linear:0.3:0.05", min_depth=2, uem="heads"),
    EarlyExitConfig("deediff", budget=0.02, uem="heads"),
    EarlyExitConfig("deediff", calibration="heads/calibration-0.02.json", uem="heads"),
    EarlyExitConfig("static", depths=[1, 2, 4]),
]


@pytest.mark.parametrize("config", ROUND_TRIPS, ids=lambda c: c.method + "-" + "-".join(c.params))
def test_a_config_round_trips_through_strict_json(config):
    text = json.dumps(config.to_dict(), allow_nan=False)
    assert EarlyExitConfig.from_dict(json.loads(text)) == config


def test_a_config_is_normalised_once():
    config = EarlyExitConfig("deediff", threshold="0.25", uem="heads")
    assert config.threshold == 0.25 and config.params == {"threshold": 0.25}
    schedule = EarlyExitConfig("deediff", threshold="cosine:0.3:0.1", uem="heads").threshold
    assert schedule == {"kind": "cosine", "high": 0.3, "low": 0.1, "k": None}
    assert EarlyExitConfig("static", depths=[4, 8]).depths == (4, 8)


@pytest.mark.parametrize("options, message", [
    ({"method": "bogus"}, "unknown method 'bogus'"),
    ({"method": "deediff", "threshold": 0.1}, "method 'deediff' reads the UEM heads: give uem"),
    ({"method": "static", "depths": [2], "uem": "heads"}, "uem only applies to method 'deediff'"),
    ({"method": "deediff", "uem": "heads"}, "needs a threshold .* or a calibration"),
    ({"method": "deediff", "threshold": math.nan, "uem": "heads"}, "threshold must too, got nan"),
    ({"method": "deediff", "threshold": math.inf, "uem": "heads"}, "threshold must too, got inf"),
    ({"method": "deediff", "threshold": "linear:nan:0.1", "uem": "heads"}, "high must be a finite number"),
    ({"method": "deediff", "budget": math.inf, "uem": "heads"}, "budget must be a finite number > 0, got inf"),
    ({"method": "deediff", "budget": math.nan, "uem": "heads"}, "budget must be a finite number > 0, got nan"),
    ({"method": "deediff", "threshold": 0.1, "min_depth": math.nan, "uem": "heads"},
     "minimum depths must be an int >= 1 or a list of them, got nan"),
    ({"method": "static", "depths": [2, 0]}, "depths must be ints >= 1, got 0"),
    ({"method": "full", "threshold": 0.1}, "threshold is a parameter of method 'deediff', not of 'full'"),
])
def test_a_bad_config_names_the_field_and_the_fix(options, message):
    with pytest.raises(ValueError, match=message):
        EarlyExitConfig(**options)


def test_from_dict_refuses_an_unknown_option():
    with pytest.raises(ValueError, match="unknown early-exit option 'thresold'; the options are"):
        EarlyExitConfig.from_dict({"method": "deediff", "thresold": 0.1})


# Attach and detach ------------------------------------------------------------------------------------------------

def test_detach_leaves_the_pipeline_bit_identical_to_one_never_attached(folders, tiny_dit):
    pipe = digits_pipe(tiny_dit(layers=LAYERS))
    reference = sample(pipe)
    before = pipeline_state(pipe)
    exits = attach_early_exits(pipe, EarlyExitConfig("deediff", threshold=0.5, uem=str(folders[0])))
    assert isinstance(pipe.scheduler, ExitAwareScheduler) and pipe.scheduler.scheduler is before["scheduler"]
    early = sample(pipe)
    assert pipe.scheduler.statistics.layer_ratio < 1 and not torch.equal(early, reference)
    assert exits.early_exit.num_blocks == LAYERS
    detach_early_exits(pipe)
    assert_same_state(before, pipeline_state(pipe))
    assert torch.equal(sample(pipe), reference)


def test_heads_with_a_fine_tuned_backbone_sample_with_it_until_detached(folders, tiny_dit):
    from diffusers import DiTTransformer2DModel

    pipe = digits_pipe(tiny_dit(layers=LAYERS))
    reference = sample(pipe)
    before = pipeline_state(pipe)
    exits = attach_early_exits(pipe, EarlyExitConfig("deediff", threshold=0.0, uem=str(folders[1])))
    assert pipe.transformer is not before["transformer"]
    # Threshold 0 never fires: the fine-tuned backbone at full depth.
    tuned = digits_pipe(DiTTransformer2DModel.from_pretrained(folders[1] / "transformer").eval())
    assert torch.equal(sample(pipe), sample(tuned)) and exits.rule.needs_uem
    detach_early_exits(pipe)
    assert_same_state(before, pipeline_state(pipe))
    assert torch.equal(sample(pipe), reference)
    # A pipeline that already runs that backbone (loaded from the same folder) keeps its own object.
    own = tuned.transformer
    attach_early_exits(tuned, EarlyExitConfig("deediff", threshold=0.5, uem=str(folders[1])))
    assert tuned.transformer is own
    detach_early_exits(tuned)


def test_a_rule_that_does_not_fit_leaves_the_pipeline_as_it_was(folders, tiny_dit):
    pipe = digits_pipe(tiny_dit(layers=LAYERS))
    before = pipeline_state(pipe)
    with pytest.raises(ValueError, match="method 'static' does not fit this model: .*has only 4"):
        attach_early_exits(pipe, EarlyExitConfig("static", depths=[2, 9]))
    with pytest.raises(ValueError, match="calibration file .*nope.json does not exist"):
        attach_early_exits(pipe, EarlyExitConfig("deediff", calibration="nope.json", uem=str(folders[1])))
    assert_same_state(before, pipeline_state(pipe))
    with pytest.raises(ValueError, match="no early exits are attached"):
        detach_early_exits(pipe)


def test_attaching_twice_is_refused(tiny_dit):
    pipe = digits_pipe(tiny_dit(layers=LAYERS))
    attach_early_exits(pipe, EarlyExitConfig("static", depths=[2]))
    with pytest.raises(ValueError, match="already attached to this pipeline; call detach_early_exits"):
        attach_early_exits(pipe, EarlyExitConfig("static", depths=[3]))
    detach_early_exits(pipe)


def test_a_budget_without_its_calibration_names_the_command_that_makes_it(folders, tiny_dit):
    # Calibrated budgets that exist run end to end in test_generate.py (generate images --budget).
    pipe = digits_pipe(tiny_dit(layers=LAYERS))
    with pytest.raises(ValueError, match="no calibration for budget 0.05 beside the UEMs.*diffexit calibrate uem"):
        attach_early_exits(pipe, EarlyExitConfig("deediff", budget=0.05, uem=str(folders[0])))
