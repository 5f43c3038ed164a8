"""What a newcomer hits on the image side: each bad input fails at once with one line that names the problem and
the fix (before job.json is written); ``job.json`` records the early-exit config a resume rebuilds; and how far an
image may move with the batch size."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffexit.app import generate_images
from diffexit.uem import UEMStack
from diffexit.uem.exit_config import EarlyExitConfig

LAYERS = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_dit):
    """``(pipeline folder, UEM folder)``: a 4-block DigitsDiTPipeline and random heads."""
    from diffexit.uem.digits.model import build_sampling_scheduler
    from diffexit.uem.digits.pipeline import DigitsDiTPipeline

    root = tmp_path_factory.mktemp("seams-models")
    transformer = tiny_dit(layers=LAYERS)
    DigitsDiTPipeline(transformer=transformer, scheduler=build_sampling_scheduler()).save_pretrained(root / "pipe")
    UEMStack.for_model(transformer).save_pretrained(root / "uem")
    return root / "pipe", root / "uem"


def fails(argv, capsys) -> str:
    """Run ``generate images``; assert it refused with one line, and return that line."""
    assert generate_images.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]  # loading shows progress bars on stderr too
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def truncated_copy(folder, to):
    import shutil

    shutil.copytree(folder, to)
    weights = to / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return to


@pytest.mark.parametrize("extra, message", [
    (["--steps", "100000000"], "--steps 100000000 is more than the 1000 timesteps the pipeline's scheduler was "
                               "trained with; pass --steps 1000 or fewer"),
    (["--steps", "0"], "--steps must be a positive whole number of denoising steps, got 0"),
    (["--steps", "-3"], "--steps must be a positive whole number of denoising steps, got -3"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--guidance-scale", "inf"], "--guidance-scale must be a finite number >= 0, got inf"),
    (["--guidance-scale", "nan"], "--guidance-scale must be a finite number >= 0, got nan"),
    (["--method", "deediff", "--budget", "inf"], "budget must be a finite number > 0, got inf"),
])
def test_bad_sampling_numbers_fail_before_the_job_is_written(extra, message, models, tmp_path, capsys):
    argv = ["--per-class", "1", "--pipeline", models[0], *extra]
    if "deediff" in extra:
        argv += ["--uem", models[1]]
    assert message in fails([*argv, "--out", tmp_path / "out"], capsys)
    assert not (tmp_path / "out" / "job.json").exists()


def test_class_labels_given_as_words_are_named(models, tmp_path, capsys):
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"id": "a", "class": "three"}\n')
    err = fails(["--requests", requests, "--pipeline", models[0], "--out", tmp_path / "out"], capsys)
    assert "requests.jsonl line 1: class must be a class id, a whole number such as 3, got 'three'" in err


def test_the_digits_pipeline_names_labels_it_cannot_draw(models):
    from diffexit.uem.digits.pipeline import DigitsDiTPipeline

    pipe = DigitsDiTPipeline.from_pretrained(models[0])
    with pytest.raises(ValueError, match=r"class_labels must be digits as whole numbers 0..9, like \[3\], got 'three'"):
        pipe(["three"], num_inference_steps=1)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        pipe([3], guidance_scale=float("nan"), num_inference_steps=1)


@pytest.mark.parametrize("layout, message", [
    ("missing", "UEM folder {uem} does not exist; pass the folder that `diffexit train uem --out RUN` writes RUN/uem"),
    ("empty", "cannot load the UEMs: {uem} (nor {uem}/uem) has no config.json and no "
              "diffusion_pytorch_model.safetensors; pass the folder that `diffexit train uem --out RUN` writes"),
    ("no weights", "cannot load the UEMs: {uem} (nor {uem}/uem) has no diffusion_pytorch_model.safetensors"),
    ("truncated", "cannot load the UEMs: {uem}/diffusion_pytorch_model.safetensors is unreadable (truncated, or "
                  "not a safetensors file); train them again: `diffexit train uem --out RUN` writes RUN/uem"),
])
def test_a_bad_uem_folder_says_what_is_missing_and_which_command_writes_it(layout, message, models, tmp_path,
                                                                          capsys):
    uem = tmp_path / "heads"
    if layout == "empty":
        uem.mkdir()
    elif layout == "no weights":
        uem.mkdir()
        (uem / "config.json").write_text((models[1] / "config.json").read_text())
    elif layout == "truncated":
        truncated_copy(models[1], uem)
    argv = ["--per-class", "1", "--pipeline", models[0], "--method", "deediff", "--threshold", "0.1", "--uem", uem]
    err = fails([*argv, "--out", tmp_path / "out"], capsys)
    assert message.format(uem=uem) in err and "cannot load the image pipeline" not in err
    assert not (tmp_path / "out" / "job.json").exists()


def test_train_uem_on_a_truncated_model_is_one_line(models, tmp_path, capsys):
    from diffexit.app.cli import main as cli

    model = truncated_copy(models[0] / "transformer", tmp_path / "model")
    with pytest.raises(SystemExit) as exit_info:
        cli(["train", "uem", "--model", str(model), "--out", str(tmp_path / "run"), "--steps", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert f"cannot load the DiTTransformer2DModel: {model}/diffusion_pytorch_model.safetensors is unreadable" in err
    assert err.count("cannot load") == 1 and err.count("unreadable") == 1


def test_job_json_records_the_config_a_resume_rebuilds(models, tmp_path):
    argv = ["--per-class", "1", "--classes", "1", "--pipeline", models[0], "--uem", models[1], "--method", "deediff",
            "--threshold", "linear:0.3:0.05", "--min-depth", "2", "--steps", "2", "--out", tmp_path / "out"]
    generate_images.run([str(a) for a in argv])
    recorded = json.loads((tmp_path / "out" / "job.json").read_text())["exits"]
    assert EarlyExitConfig.from_dict(recorded) == EarlyExitConfig(
        "deediff", threshold="linear:0.3:0.05", min_depth=2, uem=str(models[1].resolve()))
    generate_images.run([str(a) for a in argv])  # the same config resumes the same job


def _pixels(folder, item_id):
    return np.asarray(Image.open(io.BytesIO((folder / f"{item_id}.png").read_bytes())), dtype=int)


def test_the_batch_size_moves_a_pixel_by_one_level_at_most(models, tmp_path):
    from diffexit.uem.digits.pipeline import DigitsDiTPipeline

    # In float: the same sample at batch 1 and batch 4 is within float32 rounding of itself.
    pipe = DigitsDiTPipeline.from_pretrained(models[0])
    pipe.set_progress_bar_config(disable=True)

    def draw(labels, seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(labels, generator=generators, num_inference_steps=4, output_type="np").images

    labels, seeds = [0, 3, 7, 9], [5, 6, 7, 8]
    alone = np.concatenate([draw([c], [s]) for c, s in zip(labels, seeds)])
    together = draw(labels, seeds)
    assert np.abs(alone - together).max() < 1e-5
    # In the files: one 8-bit level at most, the rounding of that error.
    base = ["--per-class", "2", "--classes", "0", "7", "--pipeline", models[0], "--steps", "4"]
    for size in ("1", "4"):
        generate_images.run([str(a) for a in [*base, "--batch-size", size, "--out", tmp_path / size]])
    for item_id in ("c0-0000", "c0-0001", "c7-0000", "c7-0001"):
        assert np.abs(_pixels(tmp_path / "1", item_id) - _pixels(tmp_path / "4", item_id)).max() <= 1


def test_similarity_exits_with_a_cached_remainder_round_trip_through_job_json(models, tmp_path, capsys):
    argv = ["--per-class", "1", "--classes", "1", "--pipeline", models[0], "--method", "similarity",
            "--tolerance", "0.5", "--remainder", "taylor", "--refresh-every", "3", "--refresh-last", "1",
            "--exit-every", "2", "--steps", "6", "--out", tmp_path / "out"]
    result, _ = generate_images.run([str(a) for a in argv])
    recorded = json.loads((tmp_path / "out" / "job.json").read_text())["exits"]
    want = EarlyExitConfig("similarity", tolerance=0.5, remainder="taylor", refresh_every=3, refresh_last=1,
                           exit_every=2)
    assert EarlyExitConfig.from_dict(recorded) == want
    # Re-derived from CachedRemainder's schedule: steps 0 and 3 refresh (every 3rd), step 5 is the last; with one
    # refresh first, the rule runs at steps 2 and 4 (one in every two after it) and step 1 runs no block.
    depths = result.records[0]["depths"]
    assert [depths[s] for s in (0, 3, 5)] == [LAYERS] * 3 and depths[1] == 0
    assert all(1 <= depths[s] <= LAYERS for s in (2, 4))
    generate_images.run([str(a) for a in argv])  # the same settings resume the same job
    changed = [str(a) for a in argv]
    changed[changed.index("taylor")] = "cached"
    assert generate_images.main(changed) == 2
    assert "holds the outputs of a different job" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--remainder", "cached"], "method 'full' runs every block, so no block is skipped to add a remainder"),
    (["--method", "static", "--depths", "2", "--refresh-every", "2"],
     "refresh_every refreshes a cached remainder; set remainder to 'cached' or 'taylor'"),
    (["--method", "static", "--depths", "2", "--remainder", "cached", "--refresh-every", "0"],
     "refresh_every must be an int >= 1"),
    (["--method", "static", "--depths", "2", "--tolerance", "0.1"], "tolerance"),
])
def test_remainder_and_similarity_flags_are_refused_where_they_do_not_apply(extra, message, models, tmp_path, capsys):
    line = fails(["--per-class", "1", "--classes", "1", "--pipeline", models[0], "--steps", "2",
                  "--out", tmp_path / "out", *extra], capsys)
    assert message in line
    assert not (tmp_path / "out" / "job.json").exists()


def test_a_plan_refuses_remainder_flags_beside_it(models, tmp_path, capsys):
    line = fails(["--per-class", "1", "--pipeline", models[0], "--plan", tmp_path / "plan.json", "--remainder",
                  "cached", "--out", tmp_path / "out"], capsys)
    assert "--plan fixes the steps, exits and cache; drop --remainder" in line
