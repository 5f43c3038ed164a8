"""``diffexit bench images --quick`` end to end on tiny random models saved to disk."""

import json

import pytest
import torch

from diffexit.app.cli import main as cli_main
from diffexit.samplers import progress
from diffexit.uem import StaticDepth, UEMStack
from diffexit.app.bench import images as bench
from diffexit.app.bench.image_methods import image_methods
from diffexit.app.bench.images import FIGURES
from diffexit.uem.digits.classifier import DigitsClassifier, save_classifier
from diffexit.uem.digits.pipeline import DigitsDiTPipeline
from diffexit.uem.digits.model import build_sampling_scheduler, build_transformer

LAYERS = 4
STEPS = 4  # few steps and samples keep the run short; --quick still picks the timing setup
PNGS = ("pareto.png", "samples.png", "exit_depths.png")


def _random_transformer(seed):
    # adaLN-Zero starts every block as the identity; random weights make depth (and exits) change the output.
    torch.manual_seed(seed)
    model = build_transformer(image_size=16, num_layers=LAYERS, num_heads=2, head_dim=8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-images-models")
    DigitsDiTPipeline(_random_transformer(0), build_sampling_scheduler()).save_pretrained(str(root / "pipe"))
    # The layout `diffexit train uem --mode full --out DIR` writes: heads in uem/, the fine-tuned backbone beside.
    tuned = _random_transformer(1)
    tuned.save_pretrained(str(root / "uems" / "transformer"))
    torch.manual_seed(2)
    uem = UEMStack.for_model(tuned)
    with torch.no_grad():
        # Spread the heads so the uncertainty falls on both sides of the thresholds.
        uem.token_weight.copy_(torch.randn_like(uem.token_weight) * 2.0)
        uem.token_bias.copy_(torch.linspace(-4.0, 2.0, LAYERS))
    uem.save_pretrained(str(root / "uems" / "uem"))
    # A calibration beside the heads adds a row; it must be made on the backbone the heads were trained with.
    DigitsDiTPipeline(tuned, build_sampling_scheduler()).save_pretrained(str(root / "tuned-pipe"))
    assert cli_main(["calibrate", "uem", "--uem", str(root / "uems" / "uem"), "--model", str(root / "tuned-pipe"),
                     "--budget", "0.05", "--steps", str(STEPS), "--samples", "6", "--held-out", "6"]) == 0
    torch.manual_seed(3)
    save_classifier(DigitsClassifier(), root / "classifier")
    return root


def _bench(models, out, *extra):
    return cli_main(["bench", "images", "--quick", "--out", str(out), "--pipeline", str(models / "pipe"),
                     "--classifier", str(models / "classifier"), "--per-class", "1", "--steps", str(STEPS), *extra])


@pytest.fixture(scope="module")
def quick_run(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-images-out")
    assert _bench(models, out, "--uem", str(models / "uems")) == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_run_has_every_method_and_field_and_plot(quick_run):
    out, results = quick_run
    assert results["benchmark"] == "images" and results["quick"] is True
    assert results["fine_tuned_backbone"] is True
    rows = {r["method"]: r for r in results["rows"]}
    families = {r["family"] for r in rows.values()}
    assert {"full", "base", "deediff-paper", "deediff-paper-schedule", "deediff-paper-calibrated", "static", "steps",
            "fbc"} <= families
    # A calibration runs at the steps it was made for (here the bench's own), named by its file.
    assert rows["deediff-paper-cal-0.05-steps4"]["params"] == {"target": "paper", "steps": STEPS,
                                                               "calibration": "calibration-0.05-steps4.json"}
    for name, row in rows.items():
        if name.startswith("plan-") and row.get("skipped"):
            # The planner's pick at a level no searched setting reaches on these random models says the closest.
            assert "the closest is" in row["skipped"], (name, row["skipped"])
            continue
        assert "skipped" not in row, (name, row.get("skipped"))
        assert set(FIGURES) <= set(row) and isinstance(row["params"], dict)
        for key in FIGURES:
            if key == "psnr" and row["identical_to_full"]:
                assert row[key] is None  # the same images as full depth: no finite PSNR
            else:
                assert isinstance(row[key], float) and row[key] == row[key], (name, key, row[key])
        assert 0.0 < row["layer_ratio"] <= 1.0 + 1e-9 and 0.0 <= row["class_agreement"] <= 1.0
        assert row["frechet"] >= 0.0 and row["speedup_wall_b1"] > 0 and row["speedup_wall_b16"] > 0
    assert rows["full"]["layer_ratio"] == 1.0 and rows["full"]["speedup_wall_b1"] == 1.0
    for png in PNGS:
        assert (out / png).stat().st_size > 1000


def test_layer_ratios_are_the_blocks_each_method_runs(quick_run):
    _, results = quick_run
    rows = {r["method"]: r for r in results["rows"]}
    assert rows["full-base"]["layer_ratio"] == 1.0
    for name, row in rows.items():
        if row["family"] == "steps":
            assert row["layer_ratio"] == pytest.approx(row["params"]["steps"] / STEPS)
        if row["family"] == "static":
            rule = StaticDepth(row["params"]["depths"])
            want = sum(rule.depth_at(progress(i, STEPS)) for i in range(STEPS)) / (STEPS * LAYERS)
            assert row["layer_ratio"] == pytest.approx(want)
        if row["family"] == "fbc":
            # The first block always runs; the rest run on some steps (every step at the first call's start).
            assert 1 / LAYERS <= row["layer_ratio"] <= 1.0
    # Spread heads: the loosest threshold exits earlier than the strictest, which exits somewhere before the end.
    deediff = sorted((r["params"]["threshold"], r["layer_ratio"]) for r in rows.values()
                     if r["family"] == "deediff-paper")
    assert [ratio for _, ratio in deediff] == sorted((ratio for _, ratio in deediff), reverse=True)
    assert deediff[-1][1] < deediff[0][1]
    # PSNR is measured against the user's model: the shipped backbone at full depth, not the fine-tuned one.
    assert results["psnr_reference"] == "full-base"
    assert rows["full-base"]["identical_to_full"] and rows["full-base"]["psnr"] is None
    assert not rows["full"]["identical_to_full"] and rows["full"]["psnr"] > 0
    assert not rows["steps-2"]["identical_to_full"] and rows["steps-2"]["psnr"] > 0


def test_comparators_composed_rows_timing_and_goals(quick_run):
    _, results = quick_run
    rows = {r["method"]: r for r in results["rows"]}
    families = {r["family"] for r in rows.values()}
    assert {"taylorseer", "magcache", "similarity", "similarity-calibrated", "composed"} <= families
    for name, row in rows.items():
        if row["family"] == "taylorseer":
            # diffusers' schedule: warm-up steps, then one computing step in every interval; the rest run no block.
            interval, warmup = row["params"]["interval"], row["params"]["warmup"]
            computed = [s for s in range(STEPS) if s < warmup or (s - warmup - 1) % interval == 0]
            assert row["layer_ratio"] == pytest.approx(len(computed) / STEPS), name
        if row["family"] == "composed":
            assert "+" in name and row["params"].get("remainder") in ("cached", "taylor"), name
        # Every row (full depth too) is timed in the same interleaved rounds, at least three times.
        assert row["repeats"] >= 3 and row["seconds_b16"] > 0 and row["seconds_b16_spread"] >= 0, name
        assert isinstance(row["noisy"], bool), name
    # Fewer steps with a cached remainder refreshed every other step: full depth at the even steps, depth 1 between.
    for name, row in rows.items():
        if name.startswith("static-1+cached-e2+steps-"):
            n = row["params"]["steps"]
            want = sum(LAYERS if s % 2 == 0 else 1 for s in range(n)) / (STEPS * LAYERS)
            assert row["layer_ratio"] == pytest.approx(want), name
    goals = results["goals"]
    assert [level["psnr"] for level in goals["levels"]] == [20.0, 23.0, 25.0]
    assert goals["levels_met"] == sum(level["met"] for level in goals["levels"])


def test_the_planners_picks_are_rows(quick_run):
    from diffexit.app.image_plan import PlanSettings

    _, results = quick_run
    rows = {r["method"]: r for r in results["rows"]}
    plans = [rows[f"plan-{level:g}dB"] for level in (20, 23, 25)]
    for level, row in zip((20.0, 23.0, 25.0), plans):
        assert row["params"]["target_psnr"] == level
        if row.get("skipped"):
            continue
        settings = PlanSettings.from_dict({k: row["params"][k] for k in ("steps", "exits", "cache")})
        assert row["params"]["plan"] == settings.name
        techniques = settings.techniques(STEPS)
        assert row["family"] == ("composed" if len(techniques) > 1 else techniques[0])
        # The pick met its target on the planner's calibration seeds, not necessarily on the bench's samples.
        assert 0.0 < row["layer_ratio"] < 1.0


def test_each_run_appends_its_headline_figures_to_the_history(quick_run, models, tmp_path):
    out, results = quick_run
    lines = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(lines) == 1
    line = lines[0]
    assert line["benchmark"] == "images" and line["quick"] is True and line["steps"] == STEPS
    assert line["n_per_task"] == 1 and line["goals"] == results["goals"]
    assert [r["method"] for r in line["rows"]] == [r["method"] for r in results["rows"]]
    for got, row in zip(line["rows"], results["rows"]):
        assert got == {k: row.get(k) for k in bench.HISTORY_KEYS} | (
            {"skipped": row["skipped"]} if row.get("skipped") else {})
    # A second run into the same folder appends a line and keeps the first.
    again = tmp_path / "again"
    again.mkdir()
    (again / "history.jsonl").write_text((out / "history.jsonl").read_text())
    assert _bench(models, again, "--methods", "steps-2") == 0
    kept = (again / "history.jsonl").read_text().splitlines()
    assert len(kept) == 2 and json.loads(kept[0]) == line
    assert [r["method"] for r in json.loads(kept[1])["rows"]] == ["full", "steps-2"]
    assert not (again / "exit_depths.png").exists()  # no row exits: no depths to plot


def test_without_uem_weights_deediff_rows_say_why(models, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "UEM_DIR", tmp_path / "no-uem-here")
    monkeypatch.setattr(bench, "EXITS_DIR", tmp_path / "no-exits-here")
    out = tmp_path / "out"
    first = {}
    for m in image_methods(LAYERS, STEPS):
        first.setdefault(m.family, m.name)
    assert "deediff" in first and not any(f.startswith("deediff-") for f in first)
    picked = [first[f] for f in ("base", "deediff", "static", "fbc")]
    assert _bench(models, out, "--methods", *picked) == 0
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert json.loads((out / "results.json").read_text())["uem"] is None
    assert list(rows) == ["full", *picked]
    for name, row in rows.items():
        if row["family"] == "deediff" or name == "full-base":
            assert row["skipped"] and all(row[k] is None for k in FIGURES), name
        else:
            assert "skipped" not in row and row["layer_ratio"] is not None, name
    assert "no UEM weights" in rows[first["deediff"]]["skipped"]
    for png in PNGS:
        assert (out / png).is_file()


def test_missing_inputs_fail_with_the_fix(models, tmp_path, capsys):
    assert _bench(models, tmp_path / "out", "--uem", str(tmp_path / "empty")) == 1
    assert "diffexit train uem" in capsys.readouterr().err
    assert cli_main(["bench", "images", "--quick", "--pipeline", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "diffexit train image" in capsys.readouterr().err
    for bad in (["--steps", "0"], ["--methods", "deediff-paper-7"]):
        with pytest.raises(SystemExit):
            _bench(models, tmp_path / "out", *bad)
    assert not (tmp_path / "out").exists()


def test_heads_of_several_targets_each_get_rows(models, tmp_path):
    from diffexit.uem.digits.pipeline import DigitsDiTPipeline as Pipe

    transformer = Pipe.from_pretrained(str(models / "pipe")).transformer
    dirs = []
    for i, target in enumerate(("paper", "exit-cost")):
        torch.manual_seed(10 + i)
        uem = UEMStack.for_model(transformer, target=target)
        uem.save_pretrained(str(tmp_path / target))
        dirs.append(str(tmp_path / target))
    out = tmp_path / "out"
    assert _bench(models, out, "--uem", *dirs, "--methods", "deediff-paper-0.1", "deediff-exit-cost-0.05") == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["full", "deediff-paper-0.1", "deediff-exit-cost-0.05"]
    assert results["uem"] == {"paper": dirs[0], "exit-cost": dirs[1]}
    assert all("skipped" not in r for r in results["rows"])


def test_heads_of_several_targets_share_one_fine_tuned_backbone(models, tmp_path, capsys):
    # The shipped exit-trained layout: RUN/transformer once, RUN/<target> heads beside it.
    import shutil

    run = tmp_path / "exits"
    shutil.copytree(models / "uems" / "transformer", run / "transformer")
    from diffusers import DiTTransformer2DModel

    tuned = DiTTransformer2DModel.from_pretrained(str(run / "transformer"))
    for i, target in enumerate(("paper", "exit-cost")):
        torch.manual_seed(20 + i)
        UEMStack.for_model(tuned, target=target).save_pretrained(str(run / target))
    out = tmp_path / "out"
    assert _bench(models, out, "--uem", str(run / "paper"), str(run / "exit-cost"), "--methods",
                  "deediff-paper-0.1", "deediff-exit-cost-0.05") == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["full", "full-base", "deediff-paper-0.1",
                                                      "deediff-exit-cost-0.05"]
    assert results["fine_tuned_backbone"] and results["psnr_reference"] == "full-base"
    # Heads of the shipped backbone beside them are refused: they were trained on another one.
    other = tmp_path / "plain"
    UEMStack.for_model(tuned, target="normalized").save_pretrained(str(other))
    assert _bench(models, tmp_path / "bad", "--uem", str(run / "paper"), str(other)) == 1
    assert "trained on another backbone" in capsys.readouterr().err


def test_two_sets_of_heads_on_one_target_are_refused(models, tmp_path, capsys):
    from diffexit.uem.digits.pipeline import DigitsDiTPipeline as Pipe

    transformer = Pipe.from_pretrained(str(models / "pipe")).transformer
    for name in ("a", "b"):
        UEMStack.for_model(transformer).save_pretrained(str(tmp_path / name))
    assert _bench(models, tmp_path / "out", "--uem", str(tmp_path / "a"), str(tmp_path / "b")) == 1
    assert "both hold heads trained on the 'paper' target" in capsys.readouterr().err
