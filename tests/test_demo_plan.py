"""The demo's image tab with a plan file: the tab's handler (:meth:`Demo.images`) called in-process, the way gradio
calls it, gives the image ``diffexit generate images --plan`` gives from the same seed, and a plan that does not fit
is the tab's one-line ``gr.Error``, saying what ``generate images`` says. A tiny random 4-block DiT stands in for the
embedded one."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffexit.app import generate_images
from diffexit.app.demo import GRID_CELL_PIXELS, Demo, Models
from diffexit.app.image_plan import ImagePlan, PlanSettings, describe_pipeline
from diffexit.uem.exit_config import EarlyExitConfig

FULL_STEPS = 8
GUIDANCE = 1.0
# The form's own fields, none of which a plan reads but the classes, the number of images and the seed.
FORM = dict(steps=25, sampler="DPM-Solver++", guidance=4.0, rule="static depth", threshold=0.1, kind="linear",
            high=0.3, low=0.05, k=4.0, depths="1")


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory, tiny_dit):
    from diffexit.uem.digits.model import build_sampling_scheduler
    from diffexit.uem.digits.pipeline import DigitsDiTPipeline

    torch.manual_seed(0)
    transformer = tiny_dit(layers=4, classes=10)
    with torch.no_grad():
        # adaLN-zero starts every block at the identity, so every exit and cache would agree with full depth.
        for p in transformer.parameters():
            p.normal_(0, 0.1)
    root = tmp_path_factory.mktemp("demo-plan")
    DigitsDiTPipeline(transformer=transformer.eval(), scheduler=build_sampling_scheduler()).save_pretrained(
        root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="module")
def demo(pipe_dir):
    return Demo(Models(image_pipeline=pipe_dir))


@pytest.fixture(scope="module")
def similarity_calibration(demo, tmp_path_factory):
    """A similarity-exit calibration (no heads) of the tiny DiT for 3 steps at the plans' guidance."""
    from diffexit.uem.calibration import calibrate_similarity

    pipe = demo.models.pipeline()
    labels = torch.arange(4) % 10
    (calibration,) = calibrate_similarity(pipe.transformer, pipe.scheduler, labels, labels, budgets=[10.0], steps=3,
                                          guidance_scale=GUIDANCE, seed=0)
    return calibration.save(tmp_path_factory.mktemp("calibration") / "calibration-10-steps3.json")


def save_plan(demo, path, settings: PlanSettings, **made) -> str:
    """A plan as ``diffexit calibrate images`` writes it, made for the demo's pipeline (``made`` overrides)."""
    made_for = {**describe_pipeline(demo.models.pipeline(), FULL_STEPS, GUIDANCE, "test"), **made}
    held = {"layer_ratio": 0.5, "psnr": 30.0, "samples": 4, "seed": 1, "met": True}
    return str(ImagePlan(settings, 25.0, made_for, {"held_out": held}).save(path))


def demo_images(demo, plan, digits=(3,), count=1, seed=0):
    """``(plan grid [H, W, 3] uint8, full-depth grid, summary, figure, details)`` from the tab's handler."""
    f = FORM
    return demo.images(list(digits), count, f["steps"], f["sampler"], f["guidance"], f["rule"], f["threshold"],
                       f["kind"], f["high"], f["low"], f["k"], f["depths"], seed, None, plan, progress=None)


def generated(pipe_dir, plan, label, seed, out):
    """The one image ``generate images --plan`` writes for ``label`` at ``seed``: ``(pixels [S, S] uint8, record)``."""
    requests = out.parent / f"{out.name}.jsonl"
    requests.write_text(json.dumps({"id": "a", "class": label, "seed": seed}) + "\n")
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = generate_images.main(["--requests", str(requests), "--pipeline", str(pipe_dir), "--plan", plan,
                                     "--out", str(out)])
    assert code == 0, err.getvalue()
    (record,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return np.asarray(Image.open(out / record["file"])), record


def first_cell(grid: np.ndarray, size: int) -> np.ndarray:
    """The first image of a demo grid at its own resolution (the grid upscales by an integer factor, nearest)."""
    scale, gap = max(1, GRID_CELL_PIXELS // size), 2
    return grid[gap:gap + size * scale:scale, gap:gap + size * scale:scale, 0]


def plans(calibration):
    """One plan of each kind; on the tiny DiT each saves blocks (FirstBlockCache at 0.5 skips the third step's last
    three, the similarity exit leaves after the first block)."""
    return {
        "steps": PlanSettings(5),
        "fbc": PlanSettings(4, cache={"kind": "fbc", "threshold": 0.5}),
        "taylorseer": PlanSettings(6, cache={"kind": "taylorseer", "interval": 2, "warmup": 1}),
        "similarity": PlanSettings(3, exits=EarlyExitConfig("similarity", calibration=str(calibration))),
        "static": PlanSettings(4, exits=EarlyExitConfig("static", depths=(2, 4))),
    }


@pytest.mark.parametrize("name", ["steps", "fbc", "taylorseer", "similarity", "static"])
def test_a_plan_on_the_tab_gives_the_image_generate_images_gives(demo, pipe_dir, similarity_calibration, tmp_path,
                                                                 name):
    settings = plans(similarity_calibration)[name]
    plan = save_plan(demo, tmp_path / "plan.json", settings)
    grid, full, summary, _, details = demo_images(demo, plan, digits=(3,), seed=11)
    want, record = generated(pipe_dir, plan, 3, 11, tmp_path / "gen")
    assert np.array_equal(first_cell(grid, want.shape[0]), want)
    # The plan fixes the steps and guidance (the form's 25 steps, DPM-Solver++ at guidance 4 are not used), and
    # the right grid is full depth at its full steps.
    assert details["plan"] == settings.name and details["steps"] == settings.steps == len(record["depths"])
    assert details["full_steps"] == FULL_STEPS and details["guidance_scale"] == GUIDANCE
    assert f"**Plan {settings.name}**" in summary
    blocks = details["num_blocks"]
    assert details["cost"] == pytest.approx(sum(record["depths"]) / (blocks * FULL_STEPS))
    if name != "steps":  # each of the others skips blocks at its own steps too
        assert sum(record["depths"]) < blocks * settings.steps
    assert not np.array_equal(grid, full)  # the plans all run fewer steps: the tab shows a difference


def test_without_a_plan_the_tab_samples_with_the_form(demo):
    for empty in (None, "", "   "):
        _, _, summary, _, details = demo_images(demo, empty)
        assert "plan" not in details and details["steps"] == FORM["steps"] and details["sampler"] == FORM["sampler"]
        assert details["layer_ratio"] == pytest.approx(1 / 4)  # the form's static depth 1 of 4 blocks


def refusal(demo, plan) -> str:
    import gradio as gr

    with pytest.raises(gr.Error) as info:
        demo_images(demo, plan)
    message = info.value.message
    assert "\n" not in message and "Traceback" not in message
    return message


def generate_refusal(pipe_dir, plan, out) -> str:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = generate_images.main(["--per-class", "1", "--classes", "3", "--pipeline", str(pipe_dir), "--plan", plan,
                                     "--out", str(out)])
    assert code == 2
    return err.getvalue().strip().splitlines()[-1]  # after diffusers' loading bar


@pytest.mark.parametrize("settings, made, says", [
    (PlanSettings(4), {"weights_sha256": "0" * 64}, "this plan was made for other weights (test); make a plan for it "
                                                    "with `diffexit calibrate images --psnr 25 --model DIR`"),
    (PlanSettings(4), {"pipeline_class": "DiTPipeline"}, "this plan was made for a DiTPipeline, not a "
                                                         "DigitsDiTPipeline; make a plan for it with"),
    (PlanSettings(4), {"scheduler": "DDPMScheduler"}, "this plan was made for the DDPMScheduler sampler"),
    # The exits' calibration was made for 3 steps: a plan that samples 4 with it does not fit.
    ("similarity-4", {}, "calibration was made for 3 steps of DDIMScheduler at guidance 1, not 4"),
])
def test_a_plan_that_does_not_fit_is_the_tabs_error_as_generate_images_says_it(demo, pipe_dir, similarity_calibration,
                                                                               tmp_path, settings, made, says):
    if settings == "similarity-4":
        settings = PlanSettings(4, exits=EarlyExitConfig("similarity", calibration=str(similarity_calibration)))
    plan = save_plan(demo, tmp_path / "plan.json", settings, **made)
    message = refusal(demo, plan)
    assert says in message
    assert message in generate_refusal(pipe_dir, plan, tmp_path / "gen")  # the same words, after the command's
    # The tab keeps working after a refusal.
    assert demo_images(demo, save_plan(demo, tmp_path / "ok.json", PlanSettings(2)))[4]["steps"] == 2


def test_a_path_that_is_no_plan_is_the_tabs_error(demo, tmp_path):
    assert "cannot read an image plan from" in refusal(demo, str(tmp_path / "missing.json"))
    (tmp_path / "other.json").write_text("{}")
    assert "is not an image plan file; make one with `diffexit calibrate images" in refusal(
        demo, str(tmp_path / "other.json"))
