"""``diffexit calibrate images`` and its plan file: the search's pick and its held-out check, the file's round trip,
each refusal, and ``generate images --plan`` running the plan's settings. A tiny random 4-block DiT stands in for
the embedded one."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffexit.app import calibrate_images, generate_images, plan_search
from diffexit.app.image_plan import ImagePlan, PlanSettings, describe_pipeline, planned_pipeline
from diffexit.uem.exit_config import EarlyExitConfig

FULL_STEPS = 8


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory, tiny_dit):
    from diffexit.uem.digits.model import build_sampling_scheduler
    from diffexit.uem.digits.pipeline import DigitsDiTPipeline

    root = tmp_path_factory.mktemp("plan-pipe")
    DigitsDiTPipeline(transformer=tiny_dit(layers=4, classes=10),
                      scheduler=build_sampling_scheduler()).save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="module")
def pipe(pipe_dir):
    from diffexit.app.models import load_dit_pipeline

    return load_dit_pipeline(pipe_dir)


def calibrate(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = calibrate_images.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def small(pipe_dir, *extra):
    return ["--model", pipe_dir, "--steps", FULL_STEPS, "--samples", 4, "--screen", 2, "--held-out", 4,
            "--batch-size", 4, *extra]


def make_plan(pipe, settings: PlanSettings, **made) -> ImagePlan:
    made_for = {**describe_pipeline(pipe, FULL_STEPS, 1.0, "test"), **made}
    held = {"layer_ratio": 0.5, "psnr": 30.0, "samples": 4, "seed": 1, "met": True}
    return ImagePlan(settings, 25.0, made_for, {"held_out": held})


@pytest.fixture(scope="module")
def planned(pipe_dir, tmp_path_factory):
    """A plan the search picked for 20 dB on the tiny DiT: its file, and what the command printed."""
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    code, printed, err = calibrate(small(pipe_dir, "--psnr", 20, "--out", out))
    assert code == 0, err
    return out, printed


def test_the_pick_meets_its_target_on_calibration_and_the_held_out_check_is_reported_as_it_came(planned):
    path, printed = planned
    plan = ImagePlan.load(path)
    calibration, held = plan.figures["calibration"], plan.figures["held_out"]
    assert calibration["psnr"] is None or calibration["psnr"] >= 20
    assert calibration["layer_ratio"] < 1
    # Met exactly when the held-out PSNR reaches the target, and printed as recorded.
    assert held["met"] == (held["psnr"] is None or held["psnr"] >= 20)
    assert ("target 20 dB met" if held["met"] else "target 20 dB NOT met") in printed
    assert held["samples"] == 4 and held["seed"] != calibration["seed"]
    # The pick is the cheapest setting measured on all calibration samples that meets the target.
    tried = plan.provenance["tried"]
    confirmed = [t["calibration"] for t in tried if t["calibration"]]
    meeting = [c["layer_ratio"] for c in confirmed if c["psnr"] is None or c["psnr"] >= 20]
    assert calibration["layer_ratio"] == min(meeting)


def test_the_search_leaves_out_dominated_settings_and_picks_the_cheapest_that_meets(monkeypatch):
    # A made-up model of the figures: PSNR grows with steps and falls with the FirstBlockCache threshold; the cache
    # saves a share of the blocks that grows with its threshold; screening reads 1 dB optimistic.
    def measure(self, settings, n, batch, seed):
        t = settings.cache["threshold"] if settings.cache else 0.0
        cost = settings.steps / FULL_STEPS * (1 - t)
        return cost, 10 + 2.5 * settings.steps - 20 * t + (1.0 if n == self.screen else 0.0)

    monkeypatch.setattr(plan_search.Planner, "measure", measure)
    monkeypatch.setattr(plan_search, "MARGIN_DB", 1.5)  # the margin the figures below are worked out for
    planner = plan_search.Planner(None, full_steps=FULL_STEPS, guidance_scale=1.0, samples=8, screen=2, batch=8,
                                       seed=0, num_classes=10)
    space = plan_search.search_space(FULL_STEPS, 4, [])
    static = {t.settings.name for t in space if t.settings.exits.method == "static"}
    assert "steps-3+static-2+taylor-every2-last1" in static and "steps-8+static-1+taylor-every3-last1" in static
    assert "steps-8+taylorseer-3-2" in {t.settings.name for t in space}
    # The made-up figures know steps and FirstBlockCache.
    space = [t for t in space if t.settings.exits.method == "full" and (t.settings.cache or {"kind": "fbc"})["kind"]
             == "fbc"]
    tried = {t.settings.name: t for t in planner.screen_all(space, [20.0])}
    # Searched at 8 full steps: 2-6 steps, each alone and with each cache, and the caches at 8 steps.
    # steps-5 screens at 23.5 dB, clearing 20 by more than the margin: steps-6 on that chain is not run.
    assert tried["steps-6"].skipped.startswith("dominated: steps-5 already clears 20 dB")
    # steps-2 with the tightest cache screens at 15 dB, more than the margin below 20: looser caches are not run.
    assert tried["steps-2+fbc-0.1"].skipped.startswith("dominated: the tighter steps-2+fbc-0.05 already misses")
    assert tried["steps-8+fbc-0.3"].screen is not None
    best = planner.pick(list(tried.values()), 20.0)
    # Confirmed cheapest first on the screen: steps-3 (0.375, 17.5 dB), steps-4+fbc-0.1 (0.45, 18), steps-4+fbc-0.05
    # (0.475, 19), then steps-4 (0.5, 20 dB) meets it; steps-5+fbc-0.2 (0.5, 18.5) is no dearer, so it is tried too.
    assert best.settings.name == "steps-4" and best.calibration == (0.5, 20.0)
    assert tried["steps-5+fbc-0.2"].calibration is not None and tried["steps-6+fbc-0.3"].calibration is None
    with pytest.raises(plan_search.NoPlan, match=r"closest is steps-8\+fbc-0.3 at 25.00 dB \(cost 0.700\) on "
                                                      r"the screening samples"):
        planner.pick(list(tried.values()), 40.0)


def test_a_target_no_setting_meets_names_the_closest(pipe_dir, tmp_path):
    out = tmp_path / "plan.json"
    code, _, err = calibrate(small(pipe_dir, "--psnr", 300, "--out", out))
    assert code == 2 and not out.exists()
    line = err.strip().splitlines()[-1]
    assert line.startswith("diffexit calibrate images: error: no searched plan reaches 300 dB; the closest is steps-")
    assert " dB (cost " in line and "--psnr" in line


@pytest.mark.parametrize("bad, says", [
    (["--psnr", "nan"], "--psnr must be a finite number"),
    (["--psnr", "25", "--samples", "0"], "--samples must be at least 1"),
])
def test_bad_arguments_are_one_line_errors(pipe_dir, tmp_path, bad, says):
    code, _, err = calibrate(small(pipe_dir, *bad, "--out", tmp_path / "p.json"))
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"diffexit calibrate images: error: {says}")


def test_output_paths_are_checked_before_any_sampling(pipe_dir, tmp_path):
    other = tmp_path / "notes.json"
    other.write_text("{}")
    for out, says in ((tmp_path, "is a folder"), (tmp_path / "missing" / "p.json", "does not exist"),
                      (other, "is not an image plan file")):
        code, _, err = calibrate(small(pipe_dir, "--psnr", 20, "--out", out))
        assert code == 2 and says in err and "screening" not in err
    assert other.read_text() == "{}"


def exit_files(root):
    """A UEM folder and a calibration file under ``root`` (their bytes stand in: a plan reads only their digests)."""
    uem = root / "exit-cost"
    uem.mkdir(parents=True)
    (uem / "config.json").write_text("{}")
    (uem / "diffusion_pytorch_model.safetensors").write_bytes(b"heads")
    calibration = uem / "calibration-0.02-steps8.json"
    calibration.write_text("{}")
    return EarlyExitConfig("deediff", calibration=str(calibration), uem=str(uem))


def test_plan_round_trip(pipe, tmp_path):
    exits = exit_files(tmp_path / "models")
    for settings in (PlanSettings(5), PlanSettings(FULL_STEPS, cache={"kind": "fbc", "threshold": 0.1}),
                     PlanSettings(FULL_STEPS, cache={"kind": "taylorseer", "interval": 3, "warmup": 2}),
                     PlanSettings(FULL_STEPS, exits=exits),
                     PlanSettings(4, exits=EarlyExitConfig("static", depths=(2,), remainder="taylor", refresh_every=2,
                                                           refresh_last=1))):
        plan = make_plan(pipe, settings)
        loaded = ImagePlan.load(plan.save(tmp_path / "plan.json"))
        assert loaded.settings == settings and loaded.to_dict() == plan.to_dict()
    assert PlanSettings(FULL_STEPS, exits=exits).name == "steps-8+deediff-exit-cost-cal-0.02-steps8"


def test_a_plan_names_its_exit_files_relative_to_itself_and_refuses_changed_ones(pipe, tmp_path):
    import shutil

    exits = exit_files(tmp_path / "here" / "models")
    path = make_plan(pipe, PlanSettings(FULL_STEPS, exits=exits)).save(tmp_path / "here" / "plans" / "plan.json")
    stored = json.loads(path.read_text())
    assert stored["settings"]["exits"]["uem"] == "../models/exit-cost"
    assert stored["settings"]["exits"]["calibration"] == "../models/exit-cost/calibration-0.02-steps8.json"
    assert set(stored["made_for"]["exit_files_sha256"]) == {"uem", "calibration"}
    # The folder moves whole: the plan reads the files where they are now.
    shutil.move(tmp_path / "here", tmp_path / "there")
    moved = ImagePlan.load(tmp_path / "there" / "plans" / "plan.json")
    assert moved.settings.exits.uem == str((tmp_path / "there" / "models" / "exit-cost").resolve())
    assert moved.settings.exits.calibration == str(
        (tmp_path / "there" / "models" / "exit-cost" / "calibration-0.02-steps8.json").resolve())
    assert "exit_files_sha256" not in moved.made_for
    # Another calibration or other heads under the same names are refused with the fix.
    calibration = tmp_path / "there" / "models" / "exit-cost" / "calibration-0.02-steps8.json"
    calibration.write_text('{"other": 1}')
    with pytest.raises(ValueError, match=r"the calibration file .* differ from those plan .* was made with .*"
                                         r"diffexit calibrate images --psnr 25"):
        ImagePlan.load(tmp_path / "there" / "plans" / "plan.json")
    calibration.write_text("{}")
    (tmp_path / "there" / "models" / "exit-cost" / "diffusion_pytorch_model.safetensors").write_bytes(b"other")
    with pytest.raises(ValueError, match="the UEM weights in .* differ"):
        ImagePlan.load(tmp_path / "there" / "plans" / "plan.json")
    # The plan moved without its files: it says where it looked.
    shutil.move(tmp_path / "there" / "plans", tmp_path / "alone")
    with pytest.raises(ValueError, match=r"names the UEM folder ../models/exit-cost .* does not exist; move the "
                                         r"plan's folder whole"):
        ImagePlan.load(tmp_path / "alone" / "plan.json")


@pytest.mark.parametrize("change, says", [
    ({"pipeline_class": "DiTPipeline"}, "made for a DiTPipeline, not a DigitsDiTPipeline"),
    ({"scheduler": "DDPMScheduler"}, "made for the DDPMScheduler sampler"),
    ({"weights_sha256": "0" * 64}, "made for other weights"),
])
def test_a_plan_for_another_pipeline_is_refused_with_the_fix(pipe, change, says):
    with pytest.raises(ValueError, match=says) as e:
        make_plan(pipe, PlanSettings(3), **change).check(pipe)
    assert "diffexit calibrate images --psnr 25" in str(e.value)


def test_a_plan_for_another_step_count_or_guidance_is_refused_with_the_fix(pipe):
    plan = make_plan(pipe, PlanSettings(3))
    plan.check(pipe, full_steps=FULL_STEPS, guidance_scale=1.0)
    with pytest.raises(ValueError, match="made against 8 full steps .* not 25; drop --steps, or .*--steps 25"):
        plan.check(pipe, full_steps=25)
    with pytest.raises(ValueError, match="made for guidance 1, not 3;.*--guidance-scale 3"):
        plan.check(pipe, guidance_scale=3.0)


@pytest.mark.parametrize("edit, says", [
    (lambda d: d.update(format="other"), "is not an image plan file"),
    (lambda d: d.update(version=9), "version 9 image plan"),
    (lambda d: d["settings"].update(cache={"kind": "magic", "threshold": 1}), "cache must be one of"),
    (lambda d: d["settings"].update(steps=0), "steps must be a whole number >= 1"),
    (lambda d: d["settings"].update(cache={"kind": "taylorseer", "interval": 2, "warmup": -1}), "warmup must be"),
    (lambda d: d["figures"].pop("held_out"), "lacks its held-out check"),
    (lambda d: d["settings"].update(exits={"method": "static", "depths": [2]},
                                    cache={"kind": "fbc", "threshold": 0.1}),
     "cannot put the fbc cache on early exits"),
])
def test_a_broken_plan_file_is_refused(pipe, tmp_path, edit, says):
    data = make_plan(pipe, PlanSettings(3)).to_dict()
    edit(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=says):
        ImagePlan.load(path)


def generate(argv):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = generate_images.main([str(a) for a in argv])
    return code, err.getvalue()


def pngs(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_generate_images_runs_the_plans_steps_and_cache(pipe, pipe_dir, tmp_path):
    base = ["--per-class", 1, "--classes", 0, 1, "--pipeline", pipe_dir, "--batch-size", 2, "--guidance-scale", 1]
    steps_only = make_plan(pipe, PlanSettings(3)).save(tmp_path / "steps.json")
    assert generate([*base, "--plan", steps_only, "--out", tmp_path / "planned"])[0] == 0
    assert generate([*base, "--steps", 3, "--out", tmp_path / "plain"])[0] == 0
    planned_pngs, plain_pngs = pngs(tmp_path / "planned"), pngs(tmp_path / "plain")
    assert planned_pngs.keys() == plain_pngs.keys()
    assert all(np.array_equal(planned_pngs[k], plain_pngs[k]) for k in plain_pngs)  # same batches, same sums
    records = [json.loads(line) for line in (tmp_path / "planned" / "manifest.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["plan", "plan"] and all(r["depths"] == [4] * 3 for r in records)

    # A threshold no change reaches: FirstBlockCache runs the first block alone after the first step.
    cached = make_plan(pipe, PlanSettings(4, cache={"kind": "fbc", "threshold": 1e6})).save(tmp_path / "fbc.json")
    assert generate([*base, "--plan", cached, "--out", tmp_path / "cached"])[0] == 0
    records = [json.loads(line) for line in (tmp_path / "cached" / "manifest.jsonl").read_text().splitlines()]
    assert all(r["depths"] == [4, 1, 1, 1] for r in records)
    # TaylorSeer: a warm-up step, then one full step in every two; the steps between run no block.
    seer = make_plan(pipe, PlanSettings(4, cache={"kind": "taylorseer", "interval": 2, "warmup": 1}))
    assert generate([*base, "--plan", seer.save(tmp_path / "seer.json"), "--out", tmp_path / "seer"])[0] == 0
    seer_records = [json.loads(line) for line in (tmp_path / "seer" / "manifest.jsonl").read_text().splitlines()]
    assert all(r["depths"] == [4, 0, 4, 0] for r in seer_records)

    run = planned_pipeline(pipe, ImagePlan.load(cached).settings, 1.0)
    with torch.no_grad(), run.call_context():
        images = run.pipe([0, 1], guidance_scale=1.0, num_inference_steps=4, output_type="np",
                          generator=[torch.Generator().manual_seed(r["seed"]) for r in records]).images
    got = pngs(tmp_path / "cached")
    for r, image in zip(records, images):
        assert np.abs(got[r["file"]].astype(int) - np.asarray(Image.open(io.BytesIO(
            generate_images.png_bytes(image)))).astype(int)).max() <= 1


@pytest.mark.parametrize("extra, says", [
    (["--steps", 25], "made against 8 full steps"),
    (["--guidance-scale", 4], "made for guidance 1, not 4"),
    (["--method", "static"], "--plan fixes the steps, exits and cache; drop --method"),
])
def test_generate_images_refuses_a_plan_that_does_not_fit_in_one_line(pipe, pipe_dir, tmp_path, extra, says):
    plan = make_plan(pipe, PlanSettings(3)).save(tmp_path / "plan.json")
    code, err = generate(["--per-class", 1, "--pipeline", pipe_dir, "--plan", plan, *extra, "--out", tmp_path / "o"])
    line = err.strip().splitlines()[-1]  # after diffusers' loading bar
    assert code == 2 and line.startswith("diffexit generate images: error:") and says in line


def test_generate_images_refuses_a_plan_for_other_weights(pipe, pipe_dir, tmp_path):
    plan = make_plan(pipe, PlanSettings(3), weights_sha256="0" * 64).save(tmp_path / "plan.json")
    code, err = generate(["--per-class", 1, "--pipeline", pipe_dir, "--plan", plan, "--out", tmp_path / "o"])
    assert code == 2 and "made for other weights" in err and "diffexit calibrate images" in err


def test_the_demo_samples_a_plan_against_its_full_steps(pipe, pipe_dir, tmp_path):
    import gradio as gr

    from diffexit.app.demo.images import run_plan
    from diffexit.app.demo.models import Models

    models = Models(image_pipeline=pipe_dir)
    plan = make_plan(pipe, PlanSettings(4, cache={"kind": "fbc", "threshold": 1e6})).save(tmp_path / "plan.json")
    planned, full, summary, _, details = run_plan(models, str(plan), [1, 2], 2, 0)
    assert details["steps"] == 4 and details["full_steps"] == FULL_STEPS and details["guidance_scale"] == 1.0
    # The first step runs all 4 blocks, the other three only the first: 7 of 8 steps x 4 blocks.
    assert details["cost"] == pytest.approx(7 / 32)
    assert details["depth_counts"][0] == [0, 0, 0, 2] and details["depth_counts"][1] == [2, 0, 0, 0]
    assert "steps-4+fbc-1e+06" in summary and "cost 0.219" in summary
    reference = models.pipeline()([1, 2], guidance_scale=1.0, num_inference_steps=FULL_STEPS, output_type="pt",
                                  generator=torch.Generator().manual_seed(0)).images
    from diffexit.app.demo.images import image_grid

    assert np.array_equal(full, image_grid(reference))  # the reference is full depth at the plan's full steps
    other = make_plan(pipe, PlanSettings(4), weights_sha256="0" * 64).save(tmp_path / "other.json")
    with pytest.raises(gr.Error, match="made for other weights"):
        run_plan(models, str(other), [1], 1, 0)
    with pytest.raises(gr.Error, match="choose a plan file"):
        run_plan(models, None, [1], 1, 0)


def test_plan_methods_gives_the_bench_a_row_per_target(pipe):
    from diffexit.app.bench.image_methods import Bench, MethodSkipped

    bench = Bench(pipe, {}, "no heads", FULL_STEPS, 1.0)
    met, unmet = calibrate_images.plan_methods(bench, (20.0, 300.0), samples=2, screen=2)
    assert (met.name, unmet.name) == ("plan-20dB", "plan-300dB")
    settings = PlanSettings.from_dict({k: met.params[k] for k in ("steps", "exits", "cache")})
    assert met.params["plan"] == settings.name
    techniques = settings.techniques(FULL_STEPS)
    assert met.family == ("composed" if len(techniques) > 1 else techniques[0])
    session = met.build(bench)
    assert session.steps == settings.steps and session.generate(torch.tensor([1]), 0, 1.0).shape == (1, 1, 8, 8)
    with pytest.raises(MethodSkipped, match="no searched plan reaches 300 dB; the closest is"):
        unmet.build(bench)


def test_compare_full_with_a_plan_runs_full_depth_at_the_plans_full_steps(pipe, pipe_dir, tmp_path):
    plan = make_plan(pipe, PlanSettings(3)).save(tmp_path / "plan.json")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        result, full = generate_images.run([str(a) for a in ["--per-class", 1, "--classes", 2, "--pipeline", pipe_dir,
                                                             "--plan", plan, "--compare-full", "--out", tmp_path / "o"]])
    assert [len(r["depths"]) for r in result.records] == [3] and [len(r["depths"]) for r in full.records] == [8]
    assert "cost 0.375 against full depth at 8 steps" in printed.getvalue()
    assert "at cost 0.375" in printed.getvalue()
