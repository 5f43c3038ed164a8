"""The Gradio demo, served in-process on a free loopback port and called the way users call it.

Tiny random models (a 3-block digits DiT with random UEMs, a 2-layer text model with 48 positions) are saved to a
temporary folder and passed as paths, so the tests never need the shipped weights. ``gradio_client`` drives both
tabs; a real Chromium (Debian's ``chromium`` package, driven by Playwright) checks the page shows the results.
"""

import contextlib
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image

from diffexit.app import cli
from diffexit.app.demo import (
    EOS_GLYPH,
    GRID_CELL_PIXELS,
    GRID_COLUMNS,
    MASK_GLYPH,
    MAX_QUEUE,
    MAX_TEXT_STEPS,
    TEXT_CONCURRENCY,
    Demo,
    Models,
    build_app,
    example,
    image_grid,
    launch,
    main as demo_main,
    span_text,
    task_of,
)

BLOCKS = 3
POSITIONS = 48  # the short layout (24 + 16) fits; 24 + 32 does not
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ADD = "add:000012+000034"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_text_model):
    """``{"text", "pipe", "uem"}``: tiny random models saved the way the project's commands export them."""
    from diffexit.uem.heads import UEMStack
    from diffexit.uem.digits.pipeline import DigitsDiTPipeline
    from diffexit.uem.digits.model import build_sampling_scheduler, build_transformer

    root = tmp_path_factory.mktemp("demo-models")
    torch.manual_seed(0)
    transformer = build_transformer(image_size=8, num_layers=BLOCKS, num_heads=2, head_dim=8)
    with torch.no_grad():
        # adaLN-zero starts every output at zero, so every exit would agree; random weights make depth matter.
        for p in transformer.parameters():
            p.normal_(0, 0.1)
    DigitsDiTPipeline(transformer=transformer.eval(), scheduler=build_sampling_scheduler()).save_pretrained(
        str(root / "pipe"))
    uem = UEMStack.for_model(transformer)
    with torch.no_grad():
        uem.cond_weight.normal_(0, 0.2)
    uem.save_pretrained(str(root / "uem"))

    model, tok = tiny_text_model(max_positions=POSITIONS, never_predict_mask=True)
    model.save_pretrained(str(root / "text"))
    tok.save_pretrained(str(root / "text"))
    return {"text": root / "text", "pipe": root / "pipe", "uem": root / "uem"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serving(**paths):
    app = build_app(**paths)
    port = _free_port()
    launch(app, "127.0.0.1", port, block=False)
    try:
        yield app, f"http://127.0.0.1:{port}/"
    finally:
        app.close()


@pytest.fixture(scope="module")
def served(model_dirs):
    with _serving(text_model=model_dirs["text"], image_pipeline=model_dirs["pipe"], uem=model_dirs["uem"]) as s:
        yield s


@pytest.fixture(scope="module")
def client(served, tmp_path_factory):
    from gradio_client import Client

    return Client(served[1], verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


@pytest.fixture(scope="module")
def bare_client(model_dirs, tmp_path_factory):
    """An app with no UEMs and a text model folder that holds nothing."""
    from gradio_client import Client

    empty = tmp_path_factory.mktemp("no-text-model")
    with _serving(text_model=empty, image_pipeline=model_dirs["pipe"]) as (_, url):
        yield Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("bare-downloads")))


IMAGE_ARGS = dict(digits=[3, 7], count=4, steps=4, sampler="DDIM", guidance=2.0, rule="off", threshold=0.1,
                  kind="linear", high=0.3, low=0.05, k=4.0, depths="1 3", seed=0)
TEXT_ARGS = dict(prompt=ADD, gen_length=16, steps=16, block_length=16, halting="SchED", kind="cosine", high=7.5,
                 low=2.5, k=4.0, stat="mean")


def run_images(client, **changes):
    """``(early grid [H, W, 3], full grid, summary, heatmap, details)``."""
    early, full, summary, heatmap, details = client.predict(**{**IMAGE_ARGS, **changes}, api_name="/images")
    return np.asarray(Image.open(early)), np.asarray(Image.open(full)), summary, heatmap, details


def run_text(client, **changes):
    """``(answer, summary, span, trace plot, trace table, details)``."""
    return client.predict(**{**TEXT_ARGS, **changes}, api_name="/text")


def _app_error(call, *args, **kwargs) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        call(*args, **kwargs)
    return str(info.value)


def _grid_shape(count: int, size: int = 8) -> tuple[int, int, int]:
    cell, gap, cols = size * (GRID_CELL_PIXELS // size), 2, min(GRID_COLUMNS, count)
    rows = -(-count // cols)
    return rows * (cell + gap) + gap, cols * (cell + gap) + gap, 3


# --- command line -------------------------------------------------------------------------------------------------

def test_cli_runs_the_demo_module(capsys):
    assert cli.SINGLE["demo"][0] == "diffexit.app.demo"
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--host" in out and "127.0.0.1" in out and "--uem" in out and "--image-pipeline" in out


@pytest.mark.parametrize("flag, expect", [
    ("--text-model", "diffexit train text --export"),
    ("--image-pipeline", "DigitsDiTPipeline"),
    ("--uem", "RUN/uem"),
])
def test_cli_refuses_a_folder_without_the_model(tmp_path, capsys, flag, expect):
    with pytest.raises(SystemExit) as info:
        demo_main([flag, str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and expect in err


# --- pieces -------------------------------------------------------------------------------------------------------

def test_image_grid_tiles_in_rows_with_gutters():
    images = torch.zeros(10, 1, 8, 8)
    images[3] = 1.0
    grid = image_grid(images, columns=4, cell=64)
    assert grid.shape == (3 * 66 + 2, 4 * 66 + 2, 3) and grid.dtype == np.uint8
    # Cells are 64 px (8 px upscaled 8x) behind 2 px white gutters; image 3 is white, image 2 and 4 black.
    assert (grid[2:66, 2 + 3 * 66:2 + 3 * 66 + 64] == 255).all()
    assert (grid[2:66, 2 + 2 * 66:2 + 2 * 66 + 64] == 0).all() and (grid[68:132, 2:66] == 0).all()
    assert (grid[:2] == 255).all() and (grid[66:68] == 255).all() and (grid[:, 66:68] == 255).all()
    # The last row holds images 8 and 9; the rest of it stays white.
    assert (grid[134:198, 2:66] == 0).all() and (grid[134:198, 68:132] == 0).all()
    assert (grid[134:198, 132:] == 255).all()


def test_example_presets_use_the_task_layouts():
    from diffexit.dllm.charlm.tasks import DECODE, TASK_NAMES, layout_of

    for task in TASK_NAMES:
        prompt, gen_length, steps, block = example(task, 0)
        span = layout_of(task).span_length
        assert task_of(prompt) == task and (gen_length, (block, steps)) == (span, DECODE[span])
        assert example(task, 1)[0] != prompt
    assert task_of("hello") is None


def test_build_app_loads_nothing_and_sets_up_the_queue(tmp_path):
    # Folders with configs and no weights: building reads the class count and nothing else (models load on first
    # use).
    image = tmp_path / "image"
    (image / "transformer").mkdir(parents=True)
    (image / "model_index.json").write_text('{"_class_name": "DiTPipeline"}')
    (image / "transformer" / "config.json").write_text('{"num_embeds_ada_norm": 12}')
    app = build_app(text_model=tmp_path / "none", image_pipeline=image, uem=tmp_path / "none")
    assert app._queue.max_size == MAX_QUEUE
    limits = {fn.api_name: (fn.concurrency_limit, fn.concurrency_id) for fn in app.fns.values() if fn.api_name}
    assert limits["images"] == (1, "images")
    assert limits["text"][0] in (TEXT_CONCURRENCY, "default")
    assert app._queue.default_concurrency_limit == TEXT_CONCURRENCY


def test_api_outputs_are_named(client):
    # gradio_client users read results by name, not as value_31.
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for endpoint in ("/images", "/text"):
        labels = [r["label"] for r in api[endpoint]["returns"]]
        assert all(labels) and not any(label.startswith("value_") for label in labels), (endpoint, labels)


def test_api_types_the_inputs_as_the_handlers_take_them(client):
    # A gradio_client user builds a call from view_api()'s types; a class typed as a string ('3') was refused.
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    types = {name: {p["parameter_name"]: p["python_type"]["type"] for p in api[name]["parameters"]}
             for name in ("/images", "/text")}
    assert types["/images"]["digits"] == "list[int]"
    assert types["/images"]["count"] == types["/images"]["steps"] == types["/images"]["seed"] == "int"
    assert [types["/text"][n] for n in ("gen_length", "steps", "block_length")] == ["int"] * 3
    as_type = {"int": int, "float": float, "str": str, "list[int]": lambda v: [int(x) for x in v]}
    typed = {n: as_type[types["/images"][n]](v) for n, v in dict(digits=["3"], count="2", steps="3", seed="1").items()}
    assert run_images(client, **typed, rule="off")[4]["labels"] == [3, 3]
    # Typed without subclassing a gradio component, which writes a .pyi stub into the package at import.
    import diffexit.app.demo as demo_package

    assert not list(Path(demo_package.__file__).parent.glob("*.pyi"))


def test_the_page_has_a_title_before_its_script_runs(served):
    import urllib.request

    page = urllib.request.urlopen(served[1], timeout=60).read().decode()
    assert page.count("<title>diffexit demo</title>") == 1


def _absolute(path, text: str) -> bool:
    """Whether ``text`` names ``path`` absolutely (a relative ``../../tmp/x`` also holds the characters ``/tmp/x``)."""
    import re

    return re.search(r"(?<![\w.])" + re.escape(str(path)), text) is not None


def test_the_page_and_its_errors_show_no_absolute_paths(served, model_dirs, bare_client):
    import os
    import urllib.request

    page = urllib.request.urlopen(served[1], timeout=60).read().decode()
    for folder in model_dirs.values():
        assert not _absolute(folder, page) and f"`{os.path.relpath(folder)}`" in page
    message = _app_error(run_text, bare_client)
    assert "cannot load the text model from" in message and "no-text-model" in message
    assert not _absolute(Path(os.getcwd()).parent, message) and not _absolute("/tmp", message)


def test_an_image_pipeline_that_does_not_load_says_so_once(tmp_path):
    import gradio as gr

    (tmp_path / "pipe" / "transformer").mkdir(parents=True)
    (tmp_path / "pipe" / "model_index.json").write_text('{"_class_name": "DigitsDiTPipeline"}')
    (tmp_path / "pipe" / "transformer" / "config.json").write_text("{}")
    with pytest.raises(gr.Error) as info:
        Models(image_pipeline=tmp_path / "pipe").pipeline()
    message = info.value.message
    assert message.startswith("cannot load the image pipeline from ") and message.count("cannot load") == 1
    assert not _absolute(tmp_path, message)


def test_embedded_models_are_shown_by_name():
    models = Models(text_model="charlm-block")
    assert models.text_path.is_dir() and "embedded `charlm-block`" in models.describe()
    assert not _absolute(Path(__file__).resolve().parents[1], Models().describe())


def test_the_command_takes_an_embedded_text_model_by_name(monkeypatch):
    from diffexit.app.demo import app as demo_app

    built = []
    monkeypatch.setattr(demo_app, "build_app", lambda *a, **k: built.append(a) or "app")
    monkeypatch.setattr(demo_app, "launch", lambda *a, **k: None)
    assert demo_main(["--text-model", "charlm-block"]) == 0
    assert built[0][0] == "charlm-block"


def test_build_app_names_an_image_pipeline_folder_it_cannot_read(tmp_path):
    with pytest.raises(Exception, match="cannot read the classes of the image pipeline in .*none"):
        build_app(image_pipeline=tmp_path / "none")


# --- image tab ----------------------------------------------------------------------------------------------------

def test_images_threshold_one_exits_after_the_first_block(client):
    early, full, summary, heatmap, details = run_images(client, rule="DeeDiff: threshold", threshold=1.0)
    # Uncertainty is below 1 everywhere, so every sample stops after block 1 at every step.
    assert details["layer_ratio"] == pytest.approx(1 / BLOCKS)
    assert details["blocks_run"] == 4 * 4 and details["blocks_available"] == 4 * 4 * BLOCKS
    assert details["depth_counts"] == [[4, 0, 0]] * 4 and len(details["timesteps"]) == 4
    assert details["labels"] == [3, 7, 3, 7] and details["num_blocks"] == BLOCKS
    assert early.shape == full.shape == _grid_shape(4)
    assert np.abs(early.astype(int) - full.astype(int)).max() > 10  # one block is not the whole model
    assert details["psnr_db"] is not None and details["speedup_wall"] > 0
    assert "Layer ratio 0.333" in summary and "16 of 48 blocks" in summary
    assert heatmap["type"] == "matplotlib" and heatmap["plot"].startswith("data:image/png;base64,")


def test_images_threshold_zero_matches_full_depth(client):
    early, full, summary, _, details = run_images(client, rule="DeeDiff: threshold", threshold=0.0)
    assert details["layer_ratio"] == 1.0 and details["depth_counts"] == [[0, 0, 4]] * 4
    assert np.abs(early.astype(int) - full.astype(int)).max() <= 1


def test_images_schedule_exits_early_when_noisy_and_late_when_clean(client):
    _, _, _, _, details = run_images(client, rule="DeeDiff: schedule", kind="linear", high=1.0, low=0.0)
    counts = details["depth_counts"]
    assert counts[0] == [4, 0, 0]  # threshold 1 at progress 0: everyone leaves after block 1
    assert counts[-1] == [0, 0, 4]  # threshold 0 at progress 1: nobody leaves early
    assert details["rule"] == "DeeDiff, linear 1 -> 0"


def test_images_static_depth_and_off(client):
    _, _, _, _, details = run_images(client, rule="static depth", depths="1 3")
    # Progress 0, 1/3, 2/3, 1 over two stretches: 1, 1, 3, 3 blocks.
    assert details["depth_counts"] == [[4, 0, 0], [4, 0, 0], [0, 0, 4], [0, 0, 4]]
    assert details["layer_ratio"] == pytest.approx(8 / 12)
    early, full, _, _, details = run_images(client, rule="off")
    assert details["layer_ratio"] == 1.0 and details["rule"] == "off (full depth)"
    assert np.array_equal(early, full)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["DPM-Solver++", "DDPM"])
def test_images_other_samplers_keep_one_noise_per_seed(client, sampler):
    a, b, c = (run_images(client, sampler=sampler, rule="static depth", depths="2", count=2, steps=3, seed=seed)
               for seed in (0, 0, 1))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    assert a[4]["layer_ratio"] == pytest.approx(2 / 3) and a[4]["sampler"] == sampler


BAD_IMAGE_INPUT = [
    (dict(digits=[]), "pick at least one class (0-9)"),
    # Sliders: gradio enforces their bounds itself.
    (dict(count=0), "Value 0 is less than minimum value 1"),
    (dict(steps=201), "Value 201 is greater than maximum value 200"),
    (dict(rule="DeeDiff: threshold", threshold=1.5), "Value 1.5 is greater than maximum value 1"),
    (dict(rule="DeeDiff: schedule", high=1.5), "uncertainty threshold 'high' must be in [0, 1]"),
    (dict(rule="DeeDiff: schedule", high=0.1, low=0.5), "swap them"),
    (dict(rule="DeeDiff: schedule", kind="exp", k=0.0), "decay rate"),
    (dict(rule="static depth", depths="2 x"), "whole numbers of blocks"),
    (dict(rule="static depth", depths="4 8 12"), "the model has only 3"),
    (dict(rule="static depth", depths="0"), "ints >= 1"),
    (dict(seed=-1), "seed must be between 0"),
    (dict(sampler="Euler"), "Value: Euler is not in the list of choices"),
]


def test_images_bad_input_is_named_and_the_app_keeps_serving(client):
    for changes, message in BAD_IMAGE_INPUT:
        got = _app_error(run_images, client, **changes)
        assert message in got, (changes, got)
    assert run_images(client, rule="off", count=1)[4]["layer_ratio"] == 1.0


def test_images_plan_box_samples_the_plan_through_the_page(client, model_dirs, tmp_path):
    """The page wires its plan box to the handler: a plan runs its own steps; one for other weights is the
    message (tests/test_demo_plan.py checks the images against generate images --plan)."""
    from diffexit.app.image_plan import ImagePlan, PlanSettings, describe_pipeline
    from diffexit.app.models import load_dit_pipeline

    made_for = describe_pipeline(load_dit_pipeline(model_dirs["pipe"]), 4, 2.0, "test")
    held = {"layer_ratio": 0.5, "psnr": 30.0, "samples": 4, "seed": 1, "met": True}
    plan = ImagePlan(PlanSettings(2), 25.0, made_for, {"held_out": held}).save(tmp_path / "plan.json")
    planned, full, summary, _, details = run_images(client, plan=str(plan), count=2)
    assert details["plan"] == "steps-2" and details["steps"] == 2 and details["full_steps"] == 4
    assert planned.shape == full.shape == _grid_shape(2) and "**Plan steps-2**" in summary
    other = ImagePlan(PlanSettings(2), 25.0, {**made_for, "weights_sha256": "0" * 64}, {"held_out": held})
    message = _app_error(run_images, client, plan=str(other.save(tmp_path / "other.json")))
    assert "this plan was made for other weights" in message
    assert run_images(client, rule="off", count=1)[4]["layer_ratio"] == 1.0  # and the form runs as before


def test_without_uems_deediff_says_so_and_the_other_rules_run(bare_client):
    message = _app_error(run_images, bare_client, rule="DeeDiff: threshold", threshold=0.5)
    assert "uncertainty heads (UEMs)" in message and "--uem DIR" in message
    assert run_images(bare_client, rule="off")[4]["layer_ratio"] == 1.0
    assert run_images(bare_client, rule="static depth", depths="1")[4]["layer_ratio"] == pytest.approx(1 / 3)


def test_a_missing_text_model_is_an_error_not_a_crash(bare_client):
    message = _app_error(run_text, bare_client)
    assert "cannot load the text model" in message
    assert run_images(bare_client, rule="off", count=1)[4]["layer_ratio"] == 1.0


def test_the_command_refuses_a_broken_text_model_before_serving(tmp_path, capsys, monkeypatch):
    from diffexit.app.demo import app as demo_app

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["DiffusionLlama"], "model_type": "llama"}')
    monkeypatch.setattr(demo_app, "launch", lambda *a, **k: pytest.fail("served a demo whose text model is broken"))
    with pytest.raises(SystemExit):
        cli.main(["demo", "--text-model", str(broken)])
    err = capsys.readouterr().err
    assert "error: cannot load the text model from" in err and "Traceback" not in err


# --- text tab -----------------------------------------------------------------------------------------------------

def test_text_sched_halts_and_reports_the_speedup(client):
    answer, summary, span, plot, table, details = run_text(client, kind="constant", high=0.0)
    # Threshold 0: the margin clears it at the first pass, and every mask is filled at once.
    assert details["nfe"] == 1 and details["halt_step"] == 0 and details["full_steps_nfe"] == 16
    assert details["speedup_nfe"] == 16.0 and details["halting"] == "SchED, constant 0, mean"
    assert isinstance(answer, str) and answer == details["answer"] and details["task"] == "add"
    assert isinstance(details["valid"], bool) and isinstance(details["full_steps_valid"], bool)
    assert table["headers"][0] == "pass" and len(table["data"]) == 1 and table["data"][0][6] == "yes"
    assert MASK_GLYPH not in table["data"][0][-1] and len(table["data"][0][-1]) == 16
    assert [t["class_or_confidence"] for t in span] == ["filled at halt"] * 16
    assert "**NFE 1** against 16" in summary and "16.00x fewer forward passes" in summary
    assert plot["type"] == "matplotlib" and plot["plot"].startswith("data:image/png;base64,")


def test_text_without_a_rule_runs_every_step(client):
    answer, summary, span, _, table, details = run_text(client, halting="none (full steps)", steps=8,
                                                       block_length=4)
    assert details["nfe"] == 8 and details["halt_step"] == -1 and details["speedup_nfe"] == 1.0
    assert answer == details["full_steps_answer"]
    rows = table["data"]
    assert [r[0] for r in rows] == list(range(1, 9)) and all(r[3] is None for r in rows)
    # 16 tokens in 4 blocks of 2 steps: two tokens per pass, and blocks unmask left to right.
    assert [r[4] for r in rows] == [2] * 8 and [r[5] for r in rows] == list(range(16, 0, -2))
    assert rows[1][-1][8:] == MASK_GLYPH * 8 and MASK_GLYPH not in rows[-1][-1]
    assert "no halting rule" in summary and all(t["class_or_confidence"] != "masked" for t in span)


def test_text_prophet_runs_at_most_full_steps(client):
    _, _, _, _, table, details = run_text(client, halting="Prophet")
    assert 1 <= details["nfe"] <= 16 and len(table["data"]) == details["nfe"]
    assert details["halting"] == "Prophet, 5-token window from 0, 7.5 / 5 / 2.5"
    assert [r[3] for r in table["data"]][:1] == [7.5]


def test_text_streams_its_progress(client):
    job = client.submit(**{**TEXT_ARGS, "halting": "none (full steps)"}, api_name="/text")
    final = job.result()
    updates = job.outputs()
    assert len(updates) >= 2 and updates[-1] == final
    first = updates[0]
    assert first[1].startswith("Decoding with full steps: forward pass 1 ")
    # The first pass sees the whole span masked; the answer is not there yet.
    assert [t["class_or_confidence"] for t in first[2]] == ["masked"] * 16
    assert first[0] == "" and first[3] is None and first[5] is None


BAD_TEXT_INPUT = [
    (dict(prompt="   "), "the prompt is empty"),
    (dict(gen_length=32), "generation length 32 does not fit the model"),
    (dict(prompt="add:é"), "characters the model cannot read"),
    (dict(prompt="x" * 200), "the prompt is 200 characters; the model reads at most"),
    (dict(prompt="add:" + "1" * 30), "longer than prompt_length=24"),
    (dict(block_length=5), "block_length must divide gen_length=16"),
    (dict(block_length=4, steps=15), "must be a multiple of the number of blocks"),
    (dict(steps=0), "steps must be between 1 and 512"),
    (dict(kind="linear", high=2.0, low=5.0), "swap them"),
    (dict(kind="linear", high=-1.0), "margin threshold 'high' must be in [0"),
    (dict(halting="maybe"), "is not in the list of choices"),
]


def test_text_bad_input_is_named_and_the_app_keeps_serving(client):
    for changes, message in BAD_TEXT_INPUT:
        got = _app_error(run_text, client, **changes)
        assert message in got, (changes, got)
    assert run_text(client, kind="constant", high=0.0)[5]["nfe"] == 1


def test_closing_the_stream_stops_the_decode(model_dirs):
    # What gradio does when a user leaves mid-decode: the handler's generator is closed.
    demo = Demo(Models(text_model=model_dirs["text"]))
    model, _ = demo.models.text()
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        stream = demo.text(**{**TEXT_ARGS, "halting": "none (full steps)", "steps": MAX_TEXT_STEPS})
        first = next(stream)
        stream.close()
    finally:
        handle.remove()
    assert first[1].startswith("Decoding with full steps: forward pass 1 ")
    assert not any(t.name == "diffexit-demo-decode" for t in threading.enumerate())
    assert 1 <= len(calls) < MAX_TEXT_STEPS


def test_a_request_frees_what_earlier_requests_left(model_dirs):
    # A trace figure is a reference cycle holding its renderer's pixels: without a full collection it outlives its
    # request, and the server's memory grew with every request.
    import gc
    import io
    import weakref

    from diffexit.app.demo.models import release_freed_memory

    demo = Demo(Models(text_model=model_dirs["text"]))
    figures = []
    for _ in range(3):
        final = list(demo.text(**{**TEXT_ARGS, "halting": "none (full steps)", "steps": 4, "block_length": 4}))[-1]
        final[3].savefig(io.BytesIO(), format="png")  # as gradio encodes it: the renderer is kept
        figures.append(weakref.ref(final[3]))
        del final
    gc.disable()  # only release_freed_memory may collect
    try:
        assert any(f() is not None for f in figures)
        release_freed_memory()
        assert all(f() is None for f in figures)
    finally:
        gc.enable()


def test_example_endpoint_fills_the_preset(client):
    from diffexit.dllm.charlm.tasks import DECODE

    prompt, gen_length, steps, block = client.predict("reverse", api_name="/example")
    assert prompt.startswith("rev:") and (gen_length, steps, block) == (16, DECODE[16][1], DECODE[16][0])


def test_span_text_draws_masks_and_padding(model_dirs):
    from diffexit.dllm.charlm.model import load_text_model

    _, tok = load_text_model(model_dirs["text"])
    ids = tok("a b", add_special_tokens=False)["input_ids"] + [tok.mask_token_id, tok.eos_token_id]
    assert span_text(tok, ids) == f"a␣b{MASK_GLYPH}{EOS_GLYPH}"


# --- load ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_simultaneous_requests_all_complete_with_their_own_results(client):
    prompts = [ADD, "pick:ceah,jlon,wxrq", "rev:kbtqzea"]
    text_args = [dict(prompt=p, halting="none (full steps)") for p in prompts]
    image_args = [dict(rule="DeeDiff: threshold", threshold=0.5, seed=s) for s in (0, 1)]
    alone_text = [run_text(client, **a)[5] for a in text_args]
    alone_images = [run_images(client, **a) for a in image_args]

    text_jobs = [client.submit(**{**TEXT_ARGS, **a}, api_name="/text") for a in text_args]
    image_jobs = [client.submit(**{**IMAGE_ARGS, **a}, api_name="/images") for a in image_args]
    for job, alone in zip(text_jobs, alone_text):
        details = job.result(timeout=300)[5]
        assert (details["answer"], details["nfe"], details["full_steps_answer"]) == \
            (alone["answer"], alone["nfe"], alone["full_steps_answer"])
    for job, alone in zip(image_jobs, alone_images):
        early, full, _, _, details = job.result(timeout=300)
        assert np.array_equal(np.asarray(Image.open(early)), alone[0])
        assert np.array_equal(np.asarray(Image.open(full)), alone[1])
        assert details["depth_counts"] == alone[4]["depth_counts"]
    assert not np.array_equal(alone_images[0][1], alone_images[1][1])


# --- a real browser -----------------------------------------------------------------------------------------------

def _is_loopback(url: str) -> bool:
    parsed = urlparse(url)
    return parsed.scheme in ("data", "blob") or parsed.hostname in ("127.0.0.1", "localhost")


@pytest.mark.browser
def test_the_page_runs_both_tabs_in_chromium(served):
    if not CHROMIUM.is_file():
        pytest.skip(f"no system Chromium at {CHROMIUM}: install Debian's package with `apt-get install -y chromium`")
    from playwright.sync_api import sync_playwright

    artifacts = Path(__file__).resolve().parents[1] / "artifacts"
    artifacts.mkdir(exist_ok=True)
    outside: list[str] = []

    def offline(route):
        if _is_loopback(route.request.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            # Generous: on a busy 2-core machine the first page load alone has taken over a minute.
            page.set_default_timeout(300_000)
            page.route("**/*", offline)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(served[1])

            # Image tab (open first): a static depth schedule that fits the 3-block model.
            page.get_by_role("radio", name="static depth").check()
            page.locator("#depths textarea").fill("1 2 3")
            page.locator("#run-images").click()
            for box in ("#early-grid", "#full-grid", "#heatmap"):
                page.locator(f"{box} img").first.wait_for(state="visible")
                width = page.locator(f"{box} img").first.evaluate("img => img.complete ? img.naturalWidth : 0")
                assert width > 0, f"{box} shows no picture"
            assert "Layer ratio" in page.locator("#image-summary").inner_text()
            page.screenshot(path=str(artifacts / "demo-image.png"), full_page=True)

            page.get_by_role("tab", name="Text: SchED halting").click()
            page.locator("#run-text").click()
            page.wait_for_function("() => document.querySelector('#answer textarea')?.value.length > 0")
            page.locator("#trace img").first.wait_for(state="visible")
            assert page.locator("#trace img").first.evaluate("img => img.naturalWidth") > 0
            assert "NFE" in page.locator("#text-summary").inner_text()
            assert page.locator("#span").inner_text().strip()
            page.screenshot(path=str(artifacts / "demo-text.png"), full_page=True)
        finally:
            browser.close()
    assert (artifacts / "demo-image.png").stat().st_size > 0 and (artifacts / "demo-text.png").stat().st_size > 0
    assert not errors, errors
    assert not outside, f"the page fetched from outside this machine: {outside}"


def test_images_calibrated_rule_reads_the_files_beside_the_uems(model_dirs, tmp_path):
    import shutil

    from gradio_client import Client

    from diffexit.app.cli import main as cli

    uem = tmp_path / "uem"
    shutil.copytree(model_dirs["uem"], uem)
    assert cli(["calibrate", "uem", "--uem", str(uem), "--model", str(model_dirs["pipe"]), "--budget", "0.05",
                "--steps", "4", "--samples", "4", "--held-out", "4"]) == 0
    with _serving(text_model=model_dirs["text"], image_pipeline=model_dirs["pipe"], uem=uem) as (_, url):
        client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
        # The menu names each file by its label: the budget and, for other than 25 steps, the step count.
        details = run_images(client, rule="DeeDiff: calibrated", budget="0.05-steps4")[4]
        assert details["rule"] == "DeeDiff, calibrated to budget 0.05" and 0 < details["layer_ratio"] <= 1
        # Calibrated for 4 steps at guidance 2: another setup is refused, naming what the file was made for.
        message = _app_error(run_images, client, rule="DeeDiff: calibrated", budget="0.05-steps4", steps=5)
        assert "made for 4 steps" in message and "diffexit calibrate uem" in message
        message = _app_error(run_images, client, rule="DeeDiff: calibrated", budget="0.3")
        assert "0.3" in message and "['0.05-steps4']" in message
