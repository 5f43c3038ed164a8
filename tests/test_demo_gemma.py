"""The demo's text tab on a DiffusionGemma (``diffexit demo --text-model DIR``): a tiny random model saved to a
temporary folder, served in-process on a loopback port and called through ``gradio_client``."""

import pytest
import torch

from diffexit.app.demo import Demo, Models, build_app, launch

CANVAS = 16
PICK = "pick:ceah,jlon,wxrq"


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    from transformers import DiffusionGemmaForBlockDiffusion

    from diffexit.dllm.charlm.gemma import chat_tokenizer, gemma_config

    tok = chat_tokenizer()
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(gemma_config(tok, hidden_size=32, num_heads=2, head_dim=16,
                                                         canvas_length=CANVAS, max_positions=64)).eval()
    path = tmp_path_factory.mktemp("gemma")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def client(gemma_dir, tmp_path_factory):
    import socket

    from gradio_client import Client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(text_model=gemma_dir)
    launch(app, "127.0.0.1", port, block=False)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False,
                     download_files=str(tmp_path_factory.mktemp("downloads")))
    finally:
        app.close()


ARGS = dict(prompt=PICK, gen_length=16, steps=8, stopping="SchED", kind="constant", high=0.0, low=0.0, k=4.0,
            stat="min", confidence=0.005)


def run(client, **changes):
    """``(answer, summary, span, trace plot, trace table, details)``."""
    return client.predict(**{**ARGS, **changes}, api_name="/text")


def _app_error(client, **changes) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        run(client, **changes)
    return str(info.value)


def test_the_tab_follows_the_model_kind(gemma_dir, tmp_path):
    assert Models(text_model=gemma_dir).text_is_gemma()
    assert not Models().text_is_gemma() and not Models(text_model=tmp_path).text_is_gemma()
    assert Models(text_model=gemma_dir).gemma_canvas_length() == CANVAS


def test_example_fills_a_whole_canvas_and_one_step_per_token(client):
    prompt, gen_length, steps = client.predict("reverse", api_name="/example")
    assert prompt.startswith("rev:") and (gen_length, steps) == (CANVAS, CANVAS)
    assert tuple(client.predict("chain", api_name="/example")[1:]) == (144, CANVAS)


def test_sched_at_threshold_zero_stops_after_the_first_step(client):
    answer, summary, span, plot, table, details = run(client)
    assert details["passes"] == 1 and details["full_steps_passes"] == 8 and details["canvas_stops"] == [0]
    assert details["speedup_passes"] == 8.0 and details["stopping"] == "SchED, constant 0, min"
    assert answer == details["answer"] and details["task"] == "pick" and isinstance(details["valid"], bool)
    rows = table["data"]
    assert len(rows) == 1 and rows[0][:3] == [1, 1, 1] and rows[0][4] == 0.0 and rows[0][5] == "yes"
    assert len(rows[0][6]) == CANVAS
    assert {t["class_or_confidence"] for t in span} <= {"stopped early", "EOS padding"}
    assert "**1 decoder passes** against 8" in summary and "8.00x fewer" in summary
    assert plot["type"] == "matplotlib"


def test_every_step_without_a_rule(client):
    answer, summary, _, _, table, details = run(client, stopping="none (all steps)")
    assert details["passes"] == 8 and details["canvas_stops"] == [] and details["speedup_passes"] == 1.0
    assert answer == details["full_steps_answer"] and "every denoising step" in summary
    rows = table["data"]
    assert [r[2] for r in rows] == list(range(1, 9)) and all(r[4] is None and r[5] == "" for r in rows)


def test_the_sched_stop_is_the_first_step_whose_statistic_clears_the_threshold(client):
    # Both decodes draw the same numbers until the rule stops, so the all-steps trace says where it must stop.
    full = run(client, stopping="none (all steps)", stat="mean")
    margins = [r[3] for r in full[4]["data"]]  # without a rule the trace shows the mean margin
    threshold = sorted(margins)[len(margins) // 2]
    details = run(client, high=threshold, low=threshold, stat="mean")[5]
    first = next(i for i, m in enumerate(margins) if m >= threshold - 1e-4)
    assert details["passes"] == first + 1


def test_the_stock_rule_reads_the_mean_entropy_against_the_confidence_threshold(client):
    _, summary, _, _, table, details = run(client, stopping="stock (stable and confident)", confidence=0.5)
    assert details["stopping"] == "stock, confidence 0.5" and 1 <= details["passes"] <= 8
    assert all(r[4] == 0.5 and r[3] > 0 for r in table["data"])


def test_the_learned_rule_stops_at_the_first_step_its_statistic_clears_its_calibrated_threshold():
    # The embedded DiffusionGemma ships a learned rule; the tab is called directly (no server needed).
    from diffexit.app.demo.gemma_text import STOP_LEARNED, gemma_example, run_gemma_text

    models = Models(text_model="gemma")
    prompt, gen_length, steps = gemma_example("pick", 0, models.gemma_canvas_length())
    *_, (answer, summary, _, _, table, details) = run_gemma_text(models, prompt, gen_length, steps, STOP_LEARNED,
                                                               "cosine", 8.0, 3.0, 4.0, "min", 0.005)
    rows = table if isinstance(table, list) else table["data"]
    threshold = rows[0][4]
    assert 0 < threshold < 1 and all(r[4] == threshold for r in rows)
    assert details["stopping"] == f"learned rule, threshold {threshold:g}"
    first = next(i for i, r in enumerate(rows) if r[3] > threshold)  # statistics rounded to 4 places
    assert first == len(rows) - 1 and rows[-1][5] == "yes" and details["passes"] == len(rows) < steps
    assert answer == details["full_steps_answer"]


def test_the_learned_rule_without_a_shipped_commit_model_names_the_fix(client):
    assert "train commit" in _app_error(client, stopping="learned (the model's commit rule)")


def test_a_free_prompt_decodes_whole_canvases_through_the_chat_template(client):
    answer, _, _, _, table, details = run(client, prompt="hello", gen_length=20, steps=2,
                                          stopping="none (all steps)")
    assert details["task"] is None and details["valid"] is None
    # 20 tokens are two canvases of 16, unless an EOS ends the answer in the first.
    assert details["passes"] in (2, 4) and [r[1] for r in table["data"]][:2] == [1, 1]


def test_it_streams_each_denoising_step(client):
    job = client.submit(**{**ARGS, "stopping": "none (all steps)"}, api_name="/text")
    final = job.result()
    updates = job.outputs()
    assert len(updates) >= 2 and updates[-1] == final
    assert updates[0][1] == "Decoding with all steps: decoder pass 1." and updates[0][0] == ""
    assert len(updates[0][2]) == CANVAS and updates[0][5] is None


BAD = [
    (dict(prompt="  "), "the prompt is empty"),
    (dict(prompt="pick:é"), "characters the model cannot read"),
    (dict(gen_length=64), "generation length 64 does not fit the model"),
    (dict(steps=0), "denoising steps must be between 1 and 512"),
    (dict(kind="linear", high=-1.0), "margin threshold 'high' must be in [0"),
    (dict(stat="mean_entropy", high=1.0), "entropy threshold 'high' must be in [-10000, 0]"),
    (dict(stopping="stock (stable and confident)", confidence=-1.0), "confidence threshold must be in [0"),
    (dict(stopping="maybe"), "is not in the list of choices"),
]


def test_bad_input_is_named_and_the_app_keeps_serving(client):
    for changes, message in BAD:
        got = _app_error(client, **changes)
        assert message in got, (changes, got)
    assert run(client)[5]["passes"] == 1


def test_closing_the_stream_stops_the_decode(gemma_dir):
    import threading

    demo = Demo(Models(text_model=gemma_dir))
    model, _ = demo.models.text()
    calls = []
    # generate calls the model's forward directly, and its decoder through the module call, which hooks see.
    handle = model.model.decoder.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        stream = demo.gemma_text(**{**ARGS, "stopping": "none (all steps)", "steps": 512})
        next(stream)
        stream.close()
    finally:
        handle.remove()
    assert not any(t.name == "diffexit-demo-decode" for t in threading.enumerate())
    assert 1 <= len(calls) < 512
    assert not demo.models.gemma_lock.locked()
