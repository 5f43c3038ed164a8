"""``diffexit demo``: a Gradio app that shows what early exits buy, on the embedded models or your own.

- **Images (DeeDiff).** One batch of digits sampled with early exits, beside the same noise at full depth; the
  layer ratio, wall time and speedup, PSNR against full depth, and the exit-depth heatmap (sampling step by
  depth). The rule is off (every block, through the same hook), an uncertainty threshold (constant or a schedule
  over sampling progress; it reads the UEMs) or a static depth schedule (no UEMs). Given a plan file from
  ``diffexit calibrate images``, it samples with the plan's steps, exits and cache instead, beside full depth at the
  plan's full steps.
- **Text (SchED).** One prompt decoded under a halting rule (SchED, Prophet, or none), streamed forward pass by
  forward pass while it decodes; then the answer, its NFE, the speedup against full steps (decoded as well, for the
  comparison), the margin against the threshold at every step, and the span after every step. When the text model
  is a DiffusionGemma (``--text-model DIR``), the tab decodes with the model's own ``generate`` under SchED, the
  stock stable-and-confident rule or every step, and shows the same per denoising step (``gemma_text``).

Local and offline by design: the server binds 127.0.0.1 unless told otherwise, never opens a public share link,
sends no analytics, and the page uses system fonts, so it fetches nothing from the internet. Models load on first
use and stay cached, one copy shared by every request. Requests queue: text decodes run ``TEXT_CONCURRENCY`` at a
time; image runs one at a time, because early exits are a hook on the one shared transformer; at most
``MAX_QUEUE`` requests wait, so a burst of users cannot exhaust memory.

Bad input raises ``gr.Error`` naming the problem and the fix; the app keeps serving. This module lays out the page:
``build_app`` makes the ``gr.Blocks``; ``main`` is the command line. ``serve.launch`` serves the page with those
settings. The handlers are in ``images`` and ``text``, the models' cache in ``models``, the form checks in ``forms``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional, Sequence

import gradio as gr

from ...common.cli_help import HelpFormatter
from ...dllm.statistics import CANVAS, SPAN
from ...dllm.statistics import describe as describe_stats
from ...dllm.statistics import names as stat_names
from ..models import embedded_text_models
from .forms import CACHE_NONE, CACHES, MAX_IMAGE_STEPS, MAX_IMAGES, SCHEDULE_KINDS, int_checkboxes
from .gemma_text import GEMMA_SPAN_COLORS, GEMMA_TRACE_HEADERS, STOP_SCHED, STOP_STOCK
from .gemma_text import STOPPING as GEMMA_STOPPING
from .gemma_text import gemma_example, run_gemma_text
from .images import (IMAGE_RULES, RULE_CALIBRATED, RULE_SCHEDULE, RULE_STATIC, RULE_THRESHOLD, SAMPLERS, run_images,
                     run_plan)
from .models import Models, release_freed_memory
from .serve import launch
from .text import FIRST_TASK, HALT_SCHED, HALTING, SPAN_COLORS, TRACE_HEADERS, example, run_text

TEXT_CONCURRENCY = 2
MAX_CLASS_BOXES = 20  # beyond this, a text field of class ids
MAX_QUEUE = 16


class Demo:
    """The request handlers, bound to one set of models (what :func:`build_app` wires to the page)."""

    def __init__(self, models: Models):
        self.models = models

    # Each handler first hands back to the OS the memory earlier requests freed (:func:`release_freed_memory`):
    # gradio encodes a handler's outputs after it returns, so their buffers are freed only then.

    def images(self, digits, count, steps, sampler, guidance, rule, threshold, kind, high, low, k, depths, seed,
               budget=None, plan=None, progress=gr.Progress()):
        """Sample with the chosen exit rule, then the same noise at full depth (:func:`.images.run_images`); given a
        ``plan`` file path, with the plan instead (:func:`.images.run_plan`: it fixes the steps, sampler, guidance and
        exits, so those fields are not used)."""
        release_freed_memory()
        if plan is not None and str(plan).strip():
            return run_plan(self.models, str(plan).strip(), digits, count, seed, progress)
        return run_images(self.models, digits, count, steps, sampler, guidance, rule, threshold, kind, high, low, k,
                          depths, seed, budget, progress)

    def text(self, prompt, gen_length, steps, block_length, halting, kind, high, low, k, stat, cache=CACHE_NONE,
             parallel=0.0):
        """Decode ``prompt`` under the halting rule, KV cache and parallel commits, streaming; then plain full steps
        (:func:`.text.run_text`)."""
        release_freed_memory()
        yield from run_text(self.models, prompt, gen_length, steps, block_length, halting, kind, high, low, k, stat,
                            cache, parallel)

    def gemma_text(self, prompt, gen_length, steps, stopping, kind, high, low, k, stat, confidence):
        """Decode ``prompt`` with a DiffusionGemma's ``generate`` under the stopping rule, streaming; then every
        step (:func:`.gemma_text.run_gemma_text`)."""
        release_freed_memory()
        yield from run_gemma_text(self.models, prompt, gen_length, steps, stopping, kind, high, low, k, stat,
                                  confidence)

INTRO = """# diffexit demo
Cheaper diffusion sampling by stopping work that no longer changes the answer.
**Images:** DeeDiff early exits skip the last transformer blocks once the model is certain enough.
**Text:** SchED stops a diffusion LM's decoding (a masked-diffusion span, or a DiffusionGemma canvas) once its logit
margin clears a threshold that falls with progress.
Everything runs locally on CPU; nothing leaves this machine."""


def build_app(text_model: Optional[str | Path] = None, image_pipeline: Optional[str | Path] = None,
              uem: Optional[str | Path] = None, load_text: bool = False) -> gr.Blocks:
    """The demo as a ``gr.Blocks`` with its queue set up; nothing is loaded until a request needs it.

    Args: as :class:`Models` (paths, or an embedded text model's name; None means the embedded model);
    ``load_text``: load the text model now, so a broken one raises here (``gr.Error``) instead of on its tab's first
    request. Serve it with :func:`launch`.

    API endpoints (``gradio_client``): ``/images``, ``/text`` (a generator: intermediate results stream) and
    ``/example``.
    """
    # Gradio reads this at every analytics call; the demo must never phone home, whoever builds it.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    path = lambda p: None if p is None else Path(p)
    models = Models(text_model, path(image_pipeline), path(uem))
    demo = Demo(models)
    if load_text:
        models.text()

    # Number fields carry no minimum/maximum: gradio's own bound check does not say which field is wrong, and the
    # handlers' checks do. Sliders keep their bounds, which the page enforces.
    with gr.Blocks(title="diffexit demo", analytics_enabled=False) as app:
        gr.Markdown(INTRO)
        gr.Markdown(models.describe())
        with gr.Tab("Images: DeeDiff early exits", id="images"):
            with gr.Row():
                with gr.Column(scale=1, min_width=300):
                    num_classes = models.num_classes()
                    if num_classes <= MAX_CLASS_BOXES:
                        digits = int_checkboxes([(str(d), d) for d in range(num_classes)],
                                                value=list(range(min(8, num_classes))), label="classes",
                                                info="images cycle through these", elem_id="classes")
                    else:
                        digits = gr.Textbox(", ".join(map(str, range(4))), label=f"classes (0-{num_classes - 1})",
                                            info="class ids, separated by commas; images cycle through them",
                                            elem_id="classes")
                    # precision=0: the API types them as ints, as the handler takes them.
                    count = gr.Slider(1, MAX_IMAGES, value=8, step=1, precision=0, label="number of images")
                    steps = gr.Slider(1, MAX_IMAGE_STEPS, value=25, step=1, precision=0, label="sampling steps")
                    sampler = gr.Dropdown(list(SAMPLERS), value="DDIM", label="sampler")
                    guidance = gr.Slider(0.0, 8.0, value=models.default_guidance(), step=0.5, label="guidance scale",
                                         info="classifier-free guidance is on above 1")
                    # Without UEMs the DeeDiff rules can only fail, so the page opens on one that runs.
                    budgets = list(models.calibrations())
                    first_rule = (RULE_CALIBRATED if budgets else RULE_SCHEDULE) if models.uem_path is not None \
                        else RULE_STATIC
                    rule = gr.Radio(list(IMAGE_RULES), value=first_rule, label="early-exit rule",
                                    info="DeeDiff rules read the uncertainty heads (UEMs)")
                    threshold = gr.Slider(0.0, 1.0, value=0.1, step=0.01, label="uncertainty threshold",
                                          info="a sample exits after the first block whose mean uncertainty is "
                                               "below this", visible=first_rule == RULE_THRESHOLD)
                    with gr.Group(visible=first_rule == RULE_SCHEDULE) as schedule_group:
                        kind = gr.Dropdown(list(SCHEDULE_KINDS), value="linear", label="threshold schedule",
                                           info="over sampling progress, from 'high' (noisy) to 'low' (clean)")
                        with gr.Row():
                            high = gr.Number(0.3, label="high")
                            low = gr.Number(0.05, label="low")
                            k = gr.Number(4.0, label="k (exp only)")
                    # The smallest budget: the one that keeps quality (the README's image results).
                    budget = gr.Dropdown(budgets, value=budgets[0] if budgets else None,
                                         label="exit-error budget", visible=first_rule == RULE_CALIBRATED,
                                         info="mean change per step of the sample (pixels in [-1, 1]) that the "
                                              "calibrated thresholds allow", elem_id="budget")
                    depths = gr.Textbox("4 8 12", label="static depths", visible=first_rule == RULE_STATIC,
                                        info="blocks to run per equal stretch of sampling, noisiest first",
                                        elem_id="depths")
                    seed = gr.Number(0, precision=0, label="seed")
                    # A path, not an upload: a plan names its UEM folder and calibration file relative to its own
                    # folder, and an upload would be copied alone into gradio's temporary folder.
                    plan = gr.Textbox("", label="plan file (optional)", elem_id="plan",
                                      placeholder="path on this machine to a `diffexit calibrate images` plan",
                                      info="when given, Generate samples with the plan: it fixes the steps, sampler, "
                                           "guidance and exits, so the fields above except classes, number and "
                                           "seed are not used")
                    run_images = gr.Button("Generate", variant="primary", elem_id="run-images")
                with gr.Column(scale=2):
                    with gr.Row():
                        early_grid = gr.Image(label="early exits", format="png", type="numpy",
                                              interactive=False, elem_id="early-grid")
                        full_grid = gr.Image(label="full depth, same noise", format="png", type="numpy",
                                             interactive=False, elem_id="full-grid")
                    image_summary = gr.Markdown(label="summary", elem_id="image-summary")
                    heatmap = gr.Plot(label="exit depth by sampling step", format="png", elem_id="heatmap")
                    with gr.Accordion("measurements", open=False):
                        image_details = gr.JSON(label="details")

            def show_rule_inputs(choice):
                return (gr.update(visible=choice == RULE_THRESHOLD), gr.update(visible=choice == RULE_SCHEDULE),
                        gr.update(visible=choice == RULE_STATIC), gr.update(visible=choice == RULE_CALIBRATED))

            rule.change(show_rule_inputs, rule, [threshold, schedule_group, depths, budget], queue=False,
                        api_visibility="private")
            run_images.click(
                demo.images,
                [digits, count, steps, sampler, guidance, rule, threshold, kind, high, low, k, depths, seed, budget,
                 plan],
                [early_grid, full_grid, image_summary, heatmap, image_details],
                api_name="images", concurrency_limit=1, concurrency_id="images",
            )

        if models.text_is_gemma():
            _gemma_text_tab(demo, models)
        else:
            _text_tab(demo, models)

    app.queue(default_concurrency_limit=TEXT_CONCURRENCY, max_size=MAX_QUEUE)
    return app


def _text_outputs(span_label: str, colors: dict, trace_label: str, table_title: str, headers: list) -> list:
    """The text tab's result column: answer, summary, the span (streamed), the trace plot, the per-step table and
    the measurements, in the order the text handlers yield them."""
    with gr.Column(scale=2):
        answer = gr.Textbox(label="answer", interactive=False, elem_id="answer")
        summary = gr.Markdown(label="summary", elem_id="text-summary")
        span = gr.HighlightedText(label=span_label, color_map=colors, show_legend=True, combine_adjacent=False,
                                  elem_id="span")
        trace = gr.Plot(label=trace_label, format="png", elem_id="trace")
        with gr.Accordion(table_title, open=False):
            table = gr.Dataframe(headers=headers, label="decoding trace", wrap=True, interactive=False)
        with gr.Accordion("measurements", open=False):
            details = gr.JSON(label="details")
    return [answer, summary, span, trace, table, details]


def _text_tab(demo: Demo, models: Models) -> None:
    """The text tab for a LLaDA-style model: the decoding loop of :func:`diffexit.dllm.generate`."""
    from ...dllm.charlm.tasks import TASK_NAMES

    layout = models.block_causal_layout()

    def preset(task_name, i=0):
        prompt, gen_length, steps, block = example(task_name, i)
        return i, prompt, gen_length, steps, block if layout is None else layout[1]  # a block-causal model's own

    first = preset(FIRST_TASK)[1:]
    with gr.Tab("Text: SchED halting", id="text"):
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                with gr.Row():
                    task = gr.Dropdown(list(TASK_NAMES), value=FIRST_TASK, label="task preset",
                                       info="fills the prompt and its decode settings")
                    another = gr.Button("another example", size="sm")
                index = gr.State(0)
                prompt = gr.Textbox(first[0], label="prompt", info="a task prompt, or anything in ASCII",
                                    elem_id="prompt")
                with gr.Row():
                    gen_length = gr.Number(first[1], precision=0, label="generation length")
                    text_steps = gr.Number(first[2], precision=0, label="steps")
                    block_length = gr.Number(first[3], precision=0, label="block length")
                halting = gr.Radio(list(HALTING), value=HALT_SCHED, label="halting rule",
                                   info="Prophet: 5-token window, thresholds 7.5 / 5 / 2.5 by thirds")
                with gr.Group() as sched_group:
                    sched_kind = gr.Dropdown(list(SCHEDULE_KINDS), value="cosine", label="SchED schedule",
                                             info="margin threshold over decoding progress")
                    with gr.Row():
                        sched_high = gr.Number(7.5, label="high", elem_id="sched-high")
                        sched_low = gr.Number(2.5, label="low", elem_id="sched-low")
                        sched_k = gr.Number(4.0, label="k (exp only)", elem_id="sched-k")
                    # The min keeps every answer on the embedded model (README); the paper's mean changes 61%.
                    stat = gr.Dropdown(list(stat_names(SPAN)), value="min", label="statistic over the masked span",
                                       info=describe_stats(SPAN))
                with gr.Row():
                    cache = gr.Radio(list(CACHES), value=CACHE_NONE, label="KV cache", elem_id="cache",
                                     info="Fast-dLLM's block-wise caches; on a block-causal model prefix is exact")
                    parallel = gr.Number(0.0, label="parallel commits", elem_id="parallel",
                                         info="0: off; a confidence in (0, 1]: also commit every masked token of "
                                              "the block at least this probable")
                run_text = gr.Button("Decode", variant="primary", elem_id="run-text")
            outputs = _text_outputs("span (streams while decoding)", SPAN_COLORS, "margin against threshold",
                                    "the span after every forward pass", TRACE_HEADERS)

        preset_outputs = [index, prompt, gen_length, text_steps, block_length]
        task.change(preset, task, preset_outputs, api_name="example")
        another.click(lambda t, i: preset(t, i + 1), [task, index], preset_outputs, api_visibility="private")
        halting.change(lambda h: gr.update(visible=h == HALT_SCHED), halting, sched_group, queue=False,
                       api_visibility="private")
        run_text.click(
            demo.text,
            [prompt, gen_length, text_steps, block_length, halting, sched_kind, sched_high, sched_low, sched_k,
             stat, cache, parallel],
            outputs,
            api_name="text",
        )


def _gemma_text_tab(demo: Demo, models: Models) -> None:
    """The text tab for a DiffusionGemma: its own ``generate``, under SchED, the stock rule or every step."""
    from ...dllm.charlm.tasks import TASK_NAMES

    canvas = models.gemma_canvas_length()
    first = gemma_example(FIRST_TASK, 0, canvas)
    with gr.Tab("Text: SchED stopping (DiffusionGemma)", id="text"):
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                with gr.Row():
                    task = gr.Dropdown(list(TASK_NAMES), value=FIRST_TASK, label="task preset",
                                       info="fills the prompt and its decode settings")
                    another = gr.Button("another example", size="sm")
                index = gr.State(0)
                prompt = gr.Textbox(first[0], label="prompt",
                                    info="a task prompt (left-padded as trained), or anything else (chat template)",
                                    elem_id="prompt")
                with gr.Row():
                    gen_length = gr.Number(first[1], precision=0, label="generation length",
                                           info=f"tokens, in whole canvases of {canvas}")
                    text_steps = gr.Number(first[2], precision=0, label="denoising steps per canvas")
                stopping = gr.Radio(list(GEMMA_STOPPING), value=STOP_SCHED, label="stopping rule",
                                    info="learned: the commit rule shipped beside the weights (diffexit train commit) "
                                         "at its calibrated threshold; stock: argmax stable for one step and mean "
                                         "token entropy under the confidence threshold (transformers' "
                                         "StableAndConfidentStoppingCriteria)")
                confidence = gr.Number(0.005, label="confidence threshold (stock)", visible=False,
                                       elem_id="confidence")
                with gr.Group() as sched_group:
                    sched_kind = gr.Dropdown(list(SCHEDULE_KINDS), value="cosine", label="SchED schedule",
                                             info="threshold over the canvas's denoising progress")
                    with gr.Row():  # cosine 8 -> 3 on the min kept 99.8% of the answers (diffexit bench gemma)
                        sched_high = gr.Number(8.0, label="high", elem_id="sched-high")
                        sched_low = gr.Number(3.0, label="low", elem_id="sched-low")
                        sched_k = gr.Number(4.0, label="k (exp only)", elem_id="sched-k")
                    stat = gr.Dropdown(list(stat_names(CANVAS)), value="min", label="statistic over the canvas",
                                       info="of the temperature-scaled logits: " + describe_stats(CANVAS))
                run_text = gr.Button("Decode", variant="primary", elem_id="run-text")
            outputs = _text_outputs("argmax canvas (streams while decoding)", GEMMA_SPAN_COLORS,
                                    "statistic against threshold", "the canvas after every denoising step",
                                    GEMMA_TRACE_HEADERS)

        def preset(task_name, i=0):
            return (i, *gemma_example(task_name, i, canvas))

        preset_outputs = [index, prompt, gen_length, text_steps]
        task.change(preset, task, preset_outputs, api_name="example")
        another.click(lambda t, i: preset(t, i + 1), [task, index], preset_outputs, api_visibility="private")
        stopping.change(lambda h: (gr.update(visible=h == STOP_SCHED), gr.update(visible=h == STOP_STOCK)), stopping,
                        [sched_group, confidence], queue=False, api_visibility="private")
        run_text.click(
            demo.gemma_text,
            [prompt, gen_length, text_steps, stopping, sched_kind, sched_high, sched_low, sched_k, stat, confidence],
            outputs,
            api_name="text",
        )


def _model_dir(parser: argparse.ArgumentParser, flag: str, value: Optional[str], marker: str, hint: str):
    if value is None:
        return None
    path = Path(value)
    if not (path / marker).is_file():
        parser.error(f"{flag} {value}: no {marker} there; {hint}")
    return path


def main(argv: Sequence[str], prog: str = "diffexit demo") -> int:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=HelpFormatter,
        description="The Gradio demo: DeeDiff early exits on images and SchED halting on text, side by side with "
                    "full depth / full steps. Local only: binds 127.0.0.1 by default, never shares publicly, "
                    "sends no analytics.",
    )
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s; 0.0.0.0 exposes the demo to your network)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument("--text-model", metavar="PATH",
                   help="an exported text model folder (from `diffexit train text --export`, either --arch), any "
                        "DiffusionGemmaForBlockDiffusion folder, or an embedded model's name (charlm, "
                        "charlm-block: block-causal, where the prefix cache is exact; gemma); default: charlm")
    p.add_argument("--image-pipeline", metavar="DIR",
                   help="a DigitsDiTPipeline folder (from `diffexit train image --export`); default: embedded")
    p.add_argument("--uem", metavar="DIR",
                   help="UEM weights for the image pipeline's transformer (RUN/uem from `diffexit train uem "
                        "--out RUN`); needed by the DeeDiff rules")
    args = p.parse_args(list(argv))
    if not 0 < args.port < 65536:
        p.error(f"--port must be in 1..65535, got {args.port}")
    if args.text_model in embedded_text_models():
        text = args.text_model
    else:
        text = _model_dir(p, "--text-model", args.text_model, "config.json",
                          f"give the folder that `diffexit train text --export DIR` wrote, or one of the embedded "
                          f"models {list(embedded_text_models())}")
    image = _model_dir(p, "--image-pipeline", args.image_pipeline, "model_index.json",
                       "give a DigitsDiTPipeline folder (`diffexit train image --export DIR`)")
    uem = _model_dir(p, "--uem", args.uem, "config.json",
                     "give the uem/ folder inside the run (`diffexit train uem --out RUN` writes RUN/uem)")
    try:
        # A --text-model the user named is loaded before serving: corrupt weights fail here, not on the tab.
        app = build_app(text, image, uem, load_text=text is not None)
    except gr.Error as e:
        p.error(e.message)
    launch(app, args.host, args.port, block=True)
    return 0
