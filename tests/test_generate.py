"""``diffexit generate images|text``: outputs, resume, process-count independence, SIGKILL safety, bad input.

Tiny random models saved to folders stand in for the embedded ones (and exercise the user-model paths): a 4-block
8x8 digits DiT with random UEMs, a 2-layer bidirectional Llama in the embedded text format, and a plain transformers
Llama with the same tokenizer.

Multi-process runs go through ``accelerate launch --multi_gpu --num_processes 2``: on a machine without GPUs that
starts two CPU processes in a gloo group (``diffexit.app.jobs.process_state``). ``--cpu --num_processes 2`` would
not: accelerate 1.x starts a single process for it unless given an MPI host file.
"""

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffexit.app import generate_images, generate_text, job_inputs, jobs
from diffexit.dllm.decode_spec import DecodeSpec

TIME_FIELDS = ("seconds",)


# Tiny models ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_models(tmp_path_factory, tiny_dit):
    """``(pipeline folder, UEM folder)``: a 4-block DigitsDiTPipeline and UEMs whose uncertainties spread around 0.5."""
    from diffexit.uem import UEMStack
    from diffexit.uem.digits.pipeline import DigitsDiTPipeline
    from diffexit.uem.digits.model import build_sampling_scheduler

    root = tmp_path_factory.mktemp("image-models")
    transformer = tiny_dit(layers=4)
    DigitsDiTPipeline(transformer=transformer, scheduler=build_sampling_scheduler()).save_pretrained(root / "pipe")
    uem = UEMStack.for_model(transformer)
    with torch.no_grad():
        uem.token_weight.copy_(torch.randn_like(uem.token_weight) / 4)
        uem.cond_weight.copy_(torch.randn_like(uem.cond_weight) / 4)
    uem.save_pretrained(root / "uem")
    return root / "pipe", root / "uem"


@pytest.fixture(scope="module")
def text_models(tmp_path_factory, tiny_text_model):
    """``(embedded-format folder, transformers folder)``: tiny random bidirectional Llamas, character tokenizer."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("text-models")
    for name, cls in (("embedded-format", None), ("transformers", LlamaForCausalLM)):
        # initializer_range 0.5: margins of about 0.1-1.5 logits, so a threshold halts some samples only.
        model, tok = tiny_text_model(max_positions=300, initializer_range=0.5, never_predict_mask=True, cls=cls)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root / "embedded-format", root / "transformers"


def image_args(image_models, *extra):
    pipe, uem = image_models
    return ["--per-class", "2", "--classes", "0", "3", "7", "--pipeline", str(pipe), "--uem", str(uem),
            "--method", "deediff", "--threshold", "0.5", "--steps", "4", "--batch-size", "2", *extra]


def write_prompts(path: Path) -> Path:
    from diffexit.dllm.charlm.tasks import sample

    examples = sample("pick", "heldout", 0, 3)
    rows = [{"id": f"pick-{i}", "prompt": ex.prompt, "task": "pick"} for i, ex in enumerate(examples)]
    rows.insert(1, {"prompt": "hello"})  # no task, no id: id line00002
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def text_args(text_models, prompts, *extra):
    # A constant threshold of 1.3 on the mean margin halts two of the random model's four samples (at steps 14
    # and 2); the other two stay at least 0.09 below it at every step.
    return ["--prompts", str(prompts), "--model", str(text_models[0]), "--method", "sched", "--schedule", "1.3",
            "--batch-size", "2", *extra]


# Comparing folders ----------------------------------------------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` (hidden ones too): relative path -> (bytes, mtime in ns)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def contents(folder: Path) -> dict:
    """Every file's content, JSONL records without their time fields: what must match between two runs."""
    out = {}
    for name, (data, _) in snapshot(folder).items():
        if name.endswith(".jsonl"):
            records = [json.loads(line) for line in data.decode().splitlines()]
            out[name] = [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in records]
        else:
            out[name] = data
    return out


def run_ok(module, argv, out: Path):
    return module.run([*map(str, argv), "--out", str(out)])


@pytest.fixture(scope="module")
def image_run(image_models, tmp_path_factory):
    """The reference image job (DeeDiff, with --compare-full): its folder and what it printed."""
    out = tmp_path_factory.mktemp("image-reference")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run_ok(generate_images, image_args(image_models, "--compare-full"), out)
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def image_reference(image_run):
    return image_run[0]


@pytest.fixture(scope="module")
def text_reference(text_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("text-reference")
    prompts = write_prompts(root / "prompts.jsonl")
    run_ok(generate_text, text_args(text_models, prompts, "--compare-full"), root / "out")
    return prompts, root / "out"


# The machinery --------------------------------------------------------------------------------------------------------

def test_item_seed_is_fixed_by_id_and_base_seed():
    assert job_inputs.item_seed("c3-0001") == job_inputs.item_seed("c3-0001")
    assert job_inputs.item_seed("c3-0001") != job_inputs.item_seed("c3-0002")
    assert job_inputs.item_seed("c3-0001", 1) != job_inputs.item_seed("c3-0001", 0)
    assert 0 <= job_inputs.item_seed("x") < 2**32


def test_batches_are_cut_before_they_are_dealt():
    items = [job_inputs.Item(f"i{k}", k, {"g": k % 3 == 0}) for k in range(10)]
    job = job_inputs.make_job(items, 3, group=lambda it: it.payload["g"])
    assert [[it.id for it in b.items] for b in job.batches] == [
        ["i0", "i3", "i6"], ["i9"], ["i1", "i2", "i4"], ["i5", "i7", "i8"]]
    for world in (1, 2, 3, 5):
        dealt = [b.index for rank in range(world) for b in job_inputs.deal(job.batches, rank, world)]
        assert sorted(dealt) == [b.index for b in job.batches]


def test_duplicate_ids_are_refused():
    items = [job_inputs.Item("a", 0, {}, "f line 1"), job_inputs.Item("a", 1, {}, "f line 4")]
    with pytest.raises(jobs.JobError, match="f line 4: id 'a' is already used by f line 1"):
        job_inputs.make_job(items, 2)



def test_a_non_finite_setting_is_refused_before_job_json_is_written(tmp_path):
    job = job_inputs.make_job([job_inputs.Item("a", 0, {})], 1)
    spec = jobs.job_spec({"guidance_scale": float("inf")}, job)
    with pytest.raises(jobs.JobError, match="non-finite number .*give finite values"):
        jobs.run_job(tmp_path, spec, job, engine=None, manifest="m.jsonl", desc="x")
    assert not (tmp_path / jobs.JOB_FILE).exists()

# Images ---------------------------------------------------------------------------------------------------------------

def test_images_write_pngs_and_a_manifest_of_layers_used(image_reference, capsys):
    from PIL import Image

    records = [json.loads(line) for line in (image_reference / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [f"c{c}-{k:04d}" for c in (0, 3, 7) for k in range(2)]
    assert [r["class"] for r in records] == [0, 0, 3, 3, 7, 7]
    assert len({r["seed"] for r in records}) == 6
    for r in records:
        assert r["method"] == "deediff" and len(r["depths"]) == 4 and all(1 <= d <= 4 for d in r["depths"])
        assert r["layers"] == sum(r["depths"]) and r["layer_ratio"] == pytest.approx(r["layers"] / 16)
        with Image.open(image_reference / r["file"]) as im:
            assert im.size == (8, 8) and im.mode == "L"
    assert min(r["layer_ratio"] for r in records) < 1.0  # some samples exited early
    full = [json.loads(line) for line in (image_reference / "full" / "manifest.jsonl").read_text().splitlines()]
    assert all(r["method"] == "full" and r["depths"] == [4] * 4 for r in full)
    assert sorted(p.name for p in (image_reference / "full").glob("*.png")) == sorted(r["file"] for r in records)


def test_images_summary_reports_throughput_and_speedup(image_run):
    printed = image_run[1]
    assert "generate images (deediff): 6 items (0 already complete)" in printed and "items/s" in printed
    assert "speedup over full depth" in printed and "layer ratio" in printed


def test_an_image_follows_its_seed_not_its_batch(image_models, image_reference, tmp_path):
    # The reference's full-depth items, requested in reverse order one per batch with their recorded seeds, come
    # out the same up to float rounding (different batch shapes may round differently by one level).
    import numpy as np
    from PIL import Image

    records = [json.loads(line) for line in (image_reference / "full" / "manifest.jsonl").read_text().splitlines()]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"id": r["id"], "class": r["class"], "seed": r["seed"]}) + "\n"
                                for r in reversed(records)))
    run_ok(generate_images, ["--requests", str(requests), "--pipeline", str(image_models[0]), "--steps", "4",
                             "--batch-size", "1"], tmp_path / "out")
    pixels = lambda path: np.asarray(Image.open(path), dtype=np.int16)  # noqa: E731
    for r in records:
        diff = np.abs(pixels(tmp_path / "out" / r["file"]) - pixels(image_reference / "full" / r["file"]))
        assert diff.max() <= 1, r["id"]


def test_rerun_skips_complete_items_and_touches_none_of_them(image_models, image_reference, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(image_reference, out)
    before = snapshot(out)
    result, full = run_ok(generate_images, image_args(image_models, "--compare-full"), out)
    assert result.generated == 0 and full.generated == 0
    after = snapshot(out)
    assert after.keys() == before.keys()
    for name, (data, mtime) in before.items():
        assert after[name][0] == data
        if not name.endswith("manifest.jsonl"):  # the manifest is re-merged, with the same bytes
            assert after[name][1] == mtime, name


def test_resume_redoes_only_unmarked_batches_and_clears_temp_files(image_models, image_reference, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(image_reference, out)
    # What a kill can leave: a batch whose files are there but whose mark is not, a batch with its mark but a file
    # missing (deleted by hand), a temp file, and a manifest from before.
    (out / ".parts" / "000001.jsonl").unlink()
    (out / "c7-0001.png").unlink()
    (out / ".c0-0000.png.abcd1234.tmp").write_bytes(b"half")
    (out / "manifest.jsonl").unlink()
    kept = snapshot(out)["c3-0000.png"]
    result, _ = run_ok(generate_images, image_args(image_models), out)
    assert result.generated == 4
    assert snapshot(out)["c3-0000.png"] == kept  # an existing file of a redone batch is left alone
    assert contents(out) == contents(image_reference)


def test_a_folder_holding_another_job_is_refused(image_models, image_reference, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(image_reference, out)
    before = snapshot(out)
    argv = image_args(image_models)
    argv[argv.index("--steps") + 1] = "5"
    assert generate_images.main([*argv, "--out", str(out)]) == 2
    assert "holds the outputs of a different job" in capsys.readouterr().err
    assert snapshot(out) == before


def _bad_image_inputs(tmp_path, pipe, uem):
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"id": "a", "class": 1}\n{"id": "b", "class": 2\n')
    unknown_class = tmp_path / "unknown-class.jsonl"
    unknown_class.write_text('{"id": "a", "class": 1}\n\n{"id": "b", "class": 12}\n')
    bad_method = tmp_path / "bad-method.json"
    bad_method.write_text('{"method": "bogus"}')
    not_a_pipeline = tmp_path / "not-a-pipeline"
    not_a_pipeline.mkdir()
    broken = tmp_path / "broken-pipeline"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "DigitsDiTPipeline", "transformer": ["diffusers"')
    base = ["--pipeline", str(pipe), "--steps", "2"]
    return {
        "missing input file": (["--requests", str(tmp_path / "nope.jsonl"), *base], "does not exist"),
        "malformed line": (["--requests", str(malformed), *base], "malformed.jsonl line 2: not valid JSON"),
        "unknown class in requests": (["--requests", str(unknown_class), *base],
                                      "unknown-class.jsonl line 3: unknown class 12; this model draws classes 0..9"),
        "unknown class in --classes": (["--per-class", "1", "--classes", "10", *base], "unknown class 10"),
        "unknown method": (["--per-class", "1", "--config", str(bad_method), *base], "unknown method 'bogus'"),
        "deediff without UEMs": (["--per-class", "1", "--method", "deediff", "--threshold", "0.1", *base],
                                 "pass --uem DIR"),
        "pipeline that is no pipeline": (["--per-class", "1", "--pipeline", str(not_a_pipeline)],
                                         "no model_index.json"),
        "pipeline that cannot be loaded": (["--per-class", "1", "--pipeline", str(broken)],
                                           "cannot load the image pipeline"),
        "UEMs that cannot be loaded": (["--per-class", "1", "--method", "deediff", "--threshold", "0.1",
                                        "--uem", str(not_a_pipeline), *base], "cannot load the UEMs"),
        "static depth beyond the model": (["--per-class", "1", "--method", "static", "--depths", "2", "9", *base],
                                          "has only 4"),
        "negative guidance": (["--per-class", "1", "--guidance-scale", "-1", *base], "--guidance-scale"),
    }


@pytest.mark.parametrize("case", ["missing input file", "malformed line", "unknown class in requests",
                                  "unknown class in --classes", "unknown method", "deediff without UEMs",
                                  "pipeline that is no pipeline", "pipeline that cannot be loaded",
                                  "UEMs that cannot be loaded", "static depth beyond the model",
                                  "negative guidance"])
def test_bad_image_input_names_the_problem_and_touches_nothing(case, image_models, image_reference, tmp_path, capsys):
    argv, message = _bad_image_inputs(tmp_path, *image_models)[case]
    before = snapshot(image_reference)
    assert generate_images.main([*argv, "--out", str(image_reference)]) != 0
    assert message in capsys.readouterr().err
    assert snapshot(image_reference) == before


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_unwritable_output_folder_is_refused(where, image_models, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    out = blocker if where == "a file" else blocker / "sub"
    assert generate_images.main(["--per-class", "1", "--pipeline", str(image_models[0]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert ("is not a folder" in err) if where == "a file" else ("cannot write to output folder" in err)
    assert blocker.read_text() == "keep me"


def test_unknown_method_flag_exits_nonzero(image_models, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate_images.main(["--per-class", "1", "--method", "bogus", "--out", str(tmp_path)])
    assert exit_info.value.code != 0 and "invalid choice: 'bogus'" in capsys.readouterr().err


# Text -----------------------------------------------------------------------------------------------------------------

def test_text_outputs_in_input_order_with_nfe_and_halting_step(text_reference, capsys):
    prompts, out = text_reference
    records = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["pick-0", "line00002", "pick-1", "pick-2"]
    full = {r["id"]: r for r in map(json.loads, (out / "full" / "outputs.jsonl").read_text().splitlines())}
    assert [full[r["id"]]["nfe"] for r in records] == [16] * 4
    for r in records:
        assert r["method"] == "sched" and r["prompt"] and isinstance(r["output"], str)
        if r["halt_step"] is None:
            assert r["nfe"] == full[r["id"]]["nfe"]
        else:
            assert r["nfe"] == r["halt_step"] + 1 < full[r["id"]]["nfe"]
        assert ("correct" in r) == (r["id"] != "line00002")
    assert {r["halt_step"] is None for r in records} == {True, False}  # some halted, some ran every step
    spec = json.loads((out / "job.json").read_text())
    assert spec["decode"]["params"]["schedule"] == {"kind": "constant", "high": 1.3, "low": 1.3, "k": None}


def test_embedded_format_decodes_each_prompt_in_its_tasks_layout(text_models):
    from diffexit.dllm.charlm.tasks import LAYOUTS, TASKS, sample
    from diffexit.dllm.charlm.model import load_text_model

    model, tok = load_text_model(text_models[0])
    engine = generate_text.EmbeddedEngine(model, tok, DecodeSpec())
    item = lambda prompt, **task: job_inputs.Item("x", None, {"prompt": prompt, **task}, "test")  # noqa: E731
    for name, task in TASKS.items():
        assert engine.layout(item(sample(name, "heldout", 0, 1)[0].prompt, task=name)) == LAYOUTS[task.layout]
    assert engine.layout(item("hello")) == LAYOUTS["short"]
    too_long = "x" * (LAYOUTS["short"].prompt_length + 1)
    with pytest.raises(jobs.JobError, match=f"test: prompt '{too_long}' is {len(too_long)} tokens"):
        engine.check([item(too_long)])


def test_transformers_model_path_matches_the_pipeline(text_models, tmp_path):
    from diffexit.dllm.halting import SchED
    from diffexit.dllm.pipeline import MaskedDiffusionPipeline
    from diffexit.samplers import ThresholdSchedule

    prompts = tmp_path / "prompts.jsonl"
    texts = ["pick:ceah,jlon,wxrq", "rev:abc", "hello there"]
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(texts)))
    result, _ = run_ok(generate_text, ["--prompts", str(prompts), "--model", str(text_models[1]), "--gen-length", "8",
                                       "--steps", "8", "--block-length", "4", "--method", "sched", "--schedule",
                                       "0.3", "--batch-size", "3"], tmp_path / "out")
    pipe = MaskedDiffusionPipeline.from_transformers(str(text_models[1]))
    want = pipe(texts, gen_length=8, steps=8, block_length=4, halting=SchED(ThresholdSchedule("constant", 0.3, 0.3)))
    assert [r["output"] for r in result.records] == want.texts
    assert [r["nfe"] for r in result.records] == want.generation.nfe.tolist()


@pytest.fixture(scope="module")
def gemma_model(tmp_path_factory):
    """A tiny random DiffusionGemma in the folder format ``diffexit train text --arch diffusion-gemma`` exports."""
    from transformers import DiffusionGemmaForBlockDiffusion

    from diffexit.dllm.charlm.gemma import chat_tokenizer, gemma_config

    folder = tmp_path_factory.mktemp("gemma")
    tok = chat_tokenizer()
    torch.manual_seed(0)
    DiffusionGemmaForBlockDiffusion(gemma_config(tok, hidden_size=32, num_heads=2, head_dim=16)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_diffusion_gemma_folder_decodes_each_item_alone_and_seeded(gemma_model, tmp_path):
    # Sampling, yet each answer depends only on its id: batches of 1 and of 3 give the same records.
    base = ["--task", "pick", "--n", "3", "--model", gemma_model, "--steps", "4", "--method", "sched",
            "--schedule", "cosine:7.5:2.5"]
    one, _ = run_ok(generate_text, [*base, "--batch-size", "1"], tmp_path / "one")
    three, full = run_ok(generate_text, [*base, "--batch-size", "3", "--compare-full"], tmp_path / "three")
    strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]
    assert strip(one.records) == strip(three.records)
    assert all(r["halt_step"] is None and 1 <= r["nfe"] <= 4 for r in one.records)
    assert all(r["nfe"] == 4 for r in full.records if r["output"])  # every step of the one canvas


@pytest.mark.parametrize("extra, message", [
    (["--method", "prophet"], "method 'prophet' decodes LLaDA-style loops; a DiffusionGemma model takes full or sched"),
    (["--method", "sched", "--window", "3"], "window is a parameter of method 'prophet'"),
    (["--block-length", "4"], "--block-length: not for a DiffusionGemma model"),
    (["--method", "sched", "--stat", "max"], "stat must be one of"),
])
def test_diffusion_gemma_bad_input_is_one_clear_line(gemma_model, tmp_path, capsys, extra, message):
    argv = ["--task", "pick", "--n", "1", "--model", str(gemma_model), *extra, "--out", str(tmp_path / "out")]
    assert generate_text.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0]


def test_calibrated_sched_file_is_accepted(text_models, tmp_path):
    from diffexit.dllm.halting import SchED
    from diffexit.samplers import ThresholdSchedule

    rule = SchED(ThresholdSchedule("exp", 6.0, 1.0, k=4.0), stat="min")
    config = tmp_path / "sched.json"
    config.write_text(json.dumps({"sched": rule.to_dict(), "risk": 0.05, "scale": 0.8}))
    run_ok(generate_text, ["--task", "pick", "--n", "2", "--model", str(text_models[0]), "--config", str(config)],
           tmp_path / "out")
    spec = json.loads((tmp_path / "out" / "job.json").read_text())
    assert spec["decode"]["method"] == "sched" and spec["decode"]["params"] == rule.to_dict()


def _bad_text_inputs(tmp_path, model):
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"prompt": "sort:12"}\n{"prompt": "sort:34"}\n{"prompt": sort:56}\n')
    bad_task = tmp_path / "bad-task.jsonl"
    bad_task.write_text('{"prompt": "sort:12", "task": "sorting"}\n')
    bad_method = tmp_path / "bad-method.json"
    bad_method.write_text('{"method": "bogus"}')
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["DiffusionLlama"], "model_type": "llama"}')
    base = ["--model", str(model)]
    return {
        "missing input file": (["--prompts", str(tmp_path / "nope.jsonl"), *base], "does not exist"),
        "malformed line": (["--prompts", str(malformed), *base], "malformed.jsonl line 3: not valid JSON"),
        "unknown task": (["--prompts", str(bad_task), *base], "bad-task.jsonl line 1: unknown task 'sorting'"),
        "unknown method": (["--task", "pick", "--n", "1", "--config", str(bad_method), *base],
                           "unknown method 'bogus'"),
        "parameter of another method": (["--task", "pick", "--n", "1", "--method", "full", "--window", "3", *base],
                                        "window is a parameter of method 'prophet'"),
        "model that cannot be loaded": (["--task", "pick", "--n", "1", "--model", str(broken)],
                                        "cannot load the text model"),
        "missing model": (["--task", "pick", "--n", "1", "--model", str(tmp_path / "no-such-model")],
                          "no such folder"),
        "block length that does not divide": (
            ["--task", "pick", "--n", "1", "--model", str(model.parent / "transformers"), "--gen-length", "8",
             "--steps", "8", "--block-length", "3"], "block_length must divide gen_length=8, got 3"),
    }


@pytest.mark.parametrize("case", ["missing input file", "malformed line", "unknown task", "unknown method",
                                  "parameter of another method", "model that cannot be loaded", "missing model",
                                  "block length that does not divide"])
def test_bad_text_input_names_the_problem_and_touches_nothing(case, text_models, text_reference, tmp_path, capsys):
    argv, message = _bad_text_inputs(tmp_path, text_models[0])[case]
    out = text_reference[1]
    before = snapshot(out)
    assert generate_text.main([*argv, "--out", str(out)]) != 0
    # One clear line (a model's loading bar may come before it), no traceback.
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert errors[0].count("cannot load") <= 1
    assert snapshot(out) == before


def test_text_unwritable_output_folder_is_refused(text_models, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    argv = ["--task", "pick", "--n", "1", "--model", str(text_models[0]), "--out", str(blocker / "sub")]
    assert generate_text.main(argv) == 2
    assert "cannot write to output folder" in capsys.readouterr().err
    assert blocker.read_text() == "keep me"


# Several processes, and SIGKILL ---------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(command: str, argv, processes: int, **popen) -> subprocess.Popen:
    if processes == 1:
        launcher = [sys.executable, "-m", "diffexit.app.cli"]
    else:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                    str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", str(_free_port()), "-m", "diffexit.app.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*launcher, "generate", command, *map(str, argv)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _run_launched(command, argv, processes):
    proc = _launch(command, argv, processes)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return stdout


@pytest.mark.slow
def test_two_processes_give_the_same_images_as_one(image_models, image_reference, tmp_path):
    out = tmp_path / "out"
    stdout = _run_launched("images", [*image_args(image_models, "--compare-full"), "--out", out], processes=2)
    assert "on 2 processes" in stdout
    assert contents(out) == contents(image_reference)


@pytest.mark.slow
def test_two_processes_give_the_same_text_as_one(text_models, text_reference, tmp_path):
    prompts, reference = text_reference
    out = tmp_path / "out"
    stdout = _run_launched("text", [*text_args(text_models, prompts, "--compare-full"), "--out", out], processes=2)
    assert "on 2 processes" in stdout
    assert contents(out) == contents(reference)


def _kill_tree(proc: subprocess.Popen) -> str:
    """SIGKILL the launcher and every process under it. torchrun starts its workers in sessions of their own, so
    killing the launcher's process group would leave them running. Returns its stderr."""
    import psutil

    try:
        launcher = psutil.Process(proc.pid)
        tree = [*launcher.children(recursive=True), launcher]
    except psutil.NoSuchProcess:  # it ended on its own; the caller's returncode check says so, with its stderr
        tree = []
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    return proc.communicate()[1]


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_gives_the_uninterrupted_set(image_models, tmp_path):
    # Enough work (16 images, one per batch, 20 steps) that the kill lands part-way: first a two-process run, then
    # a one-process one, each killed as soon as it has added an image; a last run resumes and finishes.
    pipe, uem = image_models
    argv = ["--per-class", "4", "--classes", "1", "2", "5", "8", "--pipeline", pipe, "--uem", uem,
            "--method", "deediff", "--threshold", "linear:0.6:0.4", "--steps", "20", "--batch-size", "1"]
    reference = tmp_path / "reference"
    run_ok(generate_images, argv, reference)

    out = tmp_path / "out"
    for processes in (2, 1):
        wanted = len(list(out.glob("*.png"))) + 1
        proc = _launch("images", [*argv, "--out", out], processes)
        deadline = time.monotonic() + 300
        while len(list(out.glob("*.png"))) < wanted and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        stderr = _kill_tree(proc)
        assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
        assert not (out / "manifest.jsonl").exists(), "the run finished before it was killed"
    run_ok(generate_images, argv, out)
    assert contents(out) == contents(reference)
    assert not [p for p in out.rglob("*.tmp")]


def test_images_deediff_with_a_calibrated_budget(image_models, tmp_path, capsys):
    import shutil

    from diffexit.app.cli import main as cli_main

    pipe, uem = image_models
    calibrated = tmp_path / "uem"
    shutil.copytree(uem, calibrated)
    assert cli_main(["calibrate", "uem", "--uem", str(calibrated), "--model", str(pipe), "--budget", "0.05",
                     "--steps", "3", "--samples", "4", "--held-out", "4"]) == 0
    base = ["--per-class", "1", "--classes", "0", "3", "--pipeline", str(pipe), "--uem", str(calibrated),
            "--method", "deediff"]
    assert generate_images.main([*base, "--budget", "0.05", "--steps", "3", "--out", str(tmp_path / "ok")]) == 0
    records = [json.loads(line) for line in (tmp_path / "ok" / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(0 < r["layer_ratio"] <= 1 for r in records)
    made = str(calibrated / "calibration-0.05-steps3.json")
    # Saved elsewhere (--out), a calibration is used by its path.
    assert cli_main(["calibrate", "uem", "--uem", str(calibrated), "--model", str(pipe), "--budget", "0.05",
                     "--steps", "3", "--samples", "4", "--held-out", "4", "--out", str(tmp_path / "elsewhere")]) == 0
    assert "--calibration FILE" in capsys.readouterr().out
    elsewhere = str(tmp_path / "elsewhere" / "calibration-0.05-steps3.json")
    assert generate_images.main([*base, "--calibration", elsewhere, "--out", str(tmp_path / "by-path")]) == 0
    by_path = [json.loads(line) for line in (tmp_path / "by-path" / "manifest.jsonl").read_text().splitlines()]
    assert [(r["depths"], r["layer_ratio"]) for r in by_path] == [(r["depths"], r["layer_ratio"]) for r in records]
    # Without --steps, the calibration's own step count (3), not the default 25 it was not made for.
    assert generate_images.main([*base, "--budget", "0.05", "--out", str(tmp_path / "own-steps")]) == 0
    own = [json.loads(line) for line in (tmp_path / "own-steps" / "manifest.jsonl").read_text().splitlines()]
    assert [len(r["depths"]) for r in own] == [3, 3]
    for extra, message in [(["--budget", "0.05", "--steps", "4"], "budgets there are 0.05-steps3.*--steps 4`"),
                           (["--calibration", made, "--steps", "4"], "made for 3 steps of DDIMScheduler"),
                           (["--budget", "0.5", "--steps", "3"], "no calibration for budget 0.5"),
                           (["--budget", "0.05", "--threshold", "0.1"], "one of the two"),
                           ([], "got neither")]:
        with pytest.raises(jobs.JobError, match=message):
            generate_images.run([*base, *extra, "--out", str(tmp_path / "bad")])


def test_a_block_causal_model_refuses_the_dual_cache_before_any_work(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(jobs.JobError, match="use cache='prefix', which is exact for it"):
        generate_text.run(["--model", "charlm-block", "--task", "zip", "--n", "2", "--cache", "dual", "--out", str(out)])
    assert not (out / "job.json").exists()


def test_the_embedded_diffusion_gemma_decodes_with_its_learned_stopping_rule(tmp_path, capsys):
    # The shipped rule is calibrated at 16 denoising steps, the embedded tasks' default for this model.
    base = ["--task", "pick", "--n", "3", "--model", "gemma", "--commit", "learned"]
    learned, full = run_ok(generate_text, [*base, "--commit-mode", "halt", "--compare-full"], tmp_path / "out")
    spec = json.loads((tmp_path / "out" / "job.json").read_text())
    assert spec["method"] == "learned-halt" and 0 < spec["params"]["threshold"] < 1
    assert all(r["nfe"] < f["nfe"] for r, f in zip(learned.records, full.records))
    assert generate_text.main([*base, "--out", str(tmp_path / "other")]) == 2
    assert "add --commit-mode halt" in capsys.readouterr().err
