"""A DiTPipeline with the layout of every public DiT checkpoint (a VAE, and a transformer with learned sigma,
``out_channels = 2 * in_channels``) through the whole DeeDiff path: train, calibrate, generate, the demo."""

import json

import pytest

from diffexit.app import generate_images
from diffexit.app.calibrate_uem import main as calibrate_main
from diffexit.app.demo import Demo, Models
from diffexit.app.train_uem import main as train_main

CLASSES = 1000  # as DiT checkpoints have: DiTPipeline draws the null class 1000, the last row of the label table


@pytest.fixture(scope="module")
def folders(tmp_path_factory, learned_sigma_folders):
    return learned_sigma_folders(tmp_path_factory.mktemp("learned-sigma"), CLASSES)


def test_train_calibrate_generate_and_demo(folders, tmp_path):
    pipe, run = folders / "pipe", tmp_path / "run"
    assert train_main(["--out", str(run), "--model", str(pipe), "--data", str(folders / "images"), "--steps", "2",
                       "--batch-size", "4", "--target", "exit-cost"]) == 0
    assert calibrate_main(["--uem", str(run), "--model", str(pipe), "--budget", "0.5", "--steps", "3",
                           "--samples", "3", "--held-out", "3"]) == 0
    calibration = json.loads((run / "uem" / "calibration-0.5-steps3.json").read_text())
    assert calibration["sampler"]["steps"] == 3 and calibration["sampler"]["guidance_scale"] == 4.0

    out = tmp_path / "gen"
    assert generate_images.main(["--per-class", "1", "--classes", "0", "2", "--pipeline", str(pipe), "--uem",
                                 str(run), "--method", "deediff", "--budget", "0.5", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    # Steps and guidance come from the calibration when none are given.
    assert len(records) == 2 and all(len(r["depths"]) == 3 for r in records)
    assert json.loads((out / "job.json").read_text())["guidance_scale"] == 4.0

    demo = Demo(Models(image_pipeline=pipe, uem=run))
    early, full, summary, _, details = demo.images(
        "0, 2", 2, 3, "DDIM", 4.0, "DeeDiff: calibrated", 0.1, "linear", 0.3, 0.05, 4.0, "", 0, "0.5-steps3",
        progress=None)
    assert early.shape == full.shape and early.shape[-1] == 3 and details["labels"] == [0, 2]
    assert 0 < details["layer_ratio"] <= 1 and "Layer ratio" in summary


def test_the_demo_offers_this_pipelines_classes(folders):
    models = Models(image_pipeline=folders / "pipe")
    assert models.num_classes() == CLASSES and models.default_guidance() == 4.0
    demo = Demo(models)
    with pytest.raises(Exception, match=r"class must be between 0 and 999, got 1000"):
        demo.images("0, 1000", 2, 2, "DDIM", 1.0, "off", 0.1, "linear", 0.3, 0.05, 4.0, "", 0, None, progress=None)
