"""``diffexit demo``: a Gradio app that shows what early exits buy, on the embedded models or your own.

- **Images (DeeDiff).** One batch of digits sampled with early exits, beside the same noise at full depth; the
  layer ratio, wall time and speedup, PSNR against full depth, and the exit-depth heatmap (sampling step by
  depth). The rule is off (every block, through the same hook), an uncertainty threshold (constant or a schedule
  over sampling progress; it reads the UEMs) or a static depth schedule (no UEMs).
- **Text (SchED).** One prompt decoded under a halting rule (SchED, Prophet, or none), streamed forward pass by
  forward pass while it decodes; then the answer, its NFE, the speedup against full steps (decoded as well, for the
  comparison), the margin against the threshold at every step, and the span after every step.

Local and offline by design: the server binds 127.0.0.1 unless told otherwise, never opens a public share link,
sends no analytics, and the page uses system fonts, so it fetches nothing from the internet. Models load on first
use and stay cached, one copy shared by every request. Requests queue: text decodes run ``TEXT_CONCURRENCY`` at a
time; image runs one at a time, because early exits are a hook on the one shared transformer; at most
``MAX_QUEUE`` requests wait, so a burst of users cannot exhaust memory.

Bad input raises ``gr.Error`` naming the problem and the fix; the app keeps serving. ``build_app`` makes the
``gr.Blocks`` and ``launch`` serves it with those settings; ``main`` is the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Generator, Optional, Sequence

import gradio as gr
import numpy as np
import torch

if TYPE_CHECKING:
    from ..dllm.output import GenerationOutput

TEXT_CONCURRENCY = 2
MAX_QUEUE = 16
MAX_IMAGES = 16
MAX_IMAGE_STEPS = 200
MAX_TEXT_STEPS = 512
STREAM_INTERVAL = 0.2  # seconds between streamed updates: smooth to the eye, and each update costs gradio work
GRID_COLUMNS = 4  # two grids side by side: four columns keep each about square
GRID_CELL_PIXELS = 96  # digits are 16x16: upscaled (nearest) so their pixels stay visible

# Samplers whose initial noise is the unit Gaussian the pipeline draws (it does not scale by init_noise_sigma,
# as DiTPipeline does not), so Euler-family samplers are left out.
SAMPLERS = {"DDIM": "DDIMScheduler", "DPM-Solver++": "DPMSolverMultistepScheduler", "DDPM": "DDPMScheduler"}
RULE_OFF, RULE_THRESHOLD, RULE_SCHEDULE, RULE_STATIC = "off", "DeeDiff: threshold", "DeeDiff: schedule", "static depth"
RULE_CALIBRATED = "DeeDiff: calibrated"
IMAGE_RULES = (RULE_OFF, RULE_THRESHOLD, RULE_SCHEDULE, RULE_CALIBRATED, RULE_STATIC)
HALT_SCHED, HALT_PROPHET, HALT_NONE = "SchED", "Prophet", "none (full steps)"
HALTING = (HALT_SCHED, HALT_PROPHET, HALT_NONE)
SCHEDULE_KINDS = ("constant", "linear", "cosine", "exp", "step")

# How a span token is drawn: a still-masked position, EOS padding and a space would be invisible otherwise.
MASK_GLYPH, EOS_GLYPH, SPACE_GLYPH = "▒", "·", "␣"
SPAN_COLORS = {"masked": "#d4d4d8", "new": "#86efac", "filled at halt": "#fcd34d", "EOS padding": "#e0e7ff"}


def _error(message: str) -> gr.Error:
    # A user's mistake, not a server fault: no traceback in the server log.
    return gr.Error(message, print_exception=False)


# --- models -------------------------------------------------------------------------------------------------------

class Models:
    """Where the demo's models come from; each is loaded on first use and then shared by every request.

    Args:
        text_model: an exported text model directory (``diffexit train text --export``); None: the embedded one.
        image_pipeline: a ``DigitsDiTPipeline`` directory; None: the embedded digits DiT.
        uem: a ``UEMStack`` directory (the ``uem/`` that ``diffexit train uem --out RUN`` writes) for that
            pipeline's transformer; None: the shipped heads for the embedded DiT, and none for a pipeline of
            your own (the DeeDiff rules are then unavailable).
    """

    def __init__(self, text_model: Optional[Path] = None, image_pipeline: Optional[Path] = None,
                 uem: Optional[Path] = None):
        if uem is None and image_pipeline is None:
            from ..uem.embedded import embedded_uem_dir

            try:
                uem = embedded_uem_dir()
            except FileNotFoundError:
                pass
        self.text_path, self.image_path, self.uem_path = text_model, image_pipeline, uem
        self._text = self._pipe = self._uem = None
        self._text_lock, self._image_load_lock = threading.Lock(), threading.Lock()
        # Held for a whole image run: the early-exit hook and the scheduler swap live on the shared pipeline.
        self.image_run_lock = threading.Lock()

    def describe(self) -> str:
        """One markdown line per model, from the paths alone (nothing is loaded)."""
        text = f"`{self.text_path}`" if self.text_path else "the embedded character-level model (`dllm/weights`)"
        image = f"`{self.image_path}`" if self.image_path else "the embedded digits DiT (`uem/weights/dit-digits`)"
        uem = (f"`{self.uem_path}`" if self.uem_path else
               "none loaded, so the DeeDiff rules are unavailable (start with `--uem DIR`)")
        return f"**Text model:** {text}  \n**Image pipeline:** {image}  \n**UEMs:** {uem}"

    def text(self):
        """``(model, tokenizer)``, loaded once."""
        with self._text_lock:
            if self._text is None:
                from ..dllm.text_model import load_embedded_text_model, load_text_model

                try:
                    model, tok = load_text_model(self.text_path) if self.text_path else load_embedded_text_model()
                except (OSError, ValueError) as e:  # FileNotFoundError is an OSError
                    where = self.text_path or "the package"
                    raise _error(f"cannot load the text model from {where}: {e}") from e
                _warm_up_text(model, tok)
                self._text = model, tok
            return self._text

    def pipeline(self):
        """The image pipeline on CPU in float32, loaded once."""
        with self._image_load_lock:
            if self._pipe is None:
                try:
                    if self.image_path:
                        from ..uem.pipeline import DigitsDiTPipeline

                        pipe = DigitsDiTPipeline.from_pretrained(str(self.image_path), dtype=torch.float32,
                                                                 local_files_only=True)
                    else:
                        from ..uem.embedded import load_embedded_pipeline

                        pipe = load_embedded_pipeline()
                except (OSError, ValueError) as e:
                    where = self.image_path or "the package"
                    raise _error(f"cannot load the image pipeline from {where}: {e}") from e
                pipe.set_progress_bar_config(disable=True)
                # The first call pays one-off costs (allocations, first dispatch); paying them now keeps them out
                # of the timed comparison.
                pipe([0], guidance_scale=1.0, num_inference_steps=1, output_type="pt")
                self._pipe = pipe
            return self._pipe

    def calibrations(self) -> dict[str, Path]:
        """The ``diffexit calibrate uem`` files beside the UEMs, by budget label (``"0.02"``); nothing is loaded."""
        from ..uem.calibration import calibration_label, calibrations_in

        if self.uem_path is None:
            return {}
        return {calibration_label(p): p for p in calibrations_in(self.uem_path)}

    def uem(self):
        """The ``UEMStack`` for the pipeline's transformer, loaded once; gr.Error when there is none."""
        if self.uem_path is None:
            source = "the embedded digits DiT ships without them yet" if self.image_path is None else \
                f"none were given for {self.image_path}"
            raise _error(
                f"The DeeDiff rules read uncertainty heads (UEMs), and {source}. Start the demo with --uem DIR "
                f"(the uem/ folder that `diffexit train uem --out RUN` writes), or pick the rule 'off' or "
                f"'static depth'."
            )
        with self._image_load_lock:
            if self._uem is None:
                from ..uem.heads import UEMStack

                try:
                    self._uem = UEMStack.from_pretrained(str(self.uem_path)).eval()
                except (OSError, ValueError) as e:
                    raise _error(f"cannot load the UEMs from {self.uem_path}: {e}") from e
            return self._uem


def _warm_up_text(model, tokenizer) -> None:
    """One short decode, so the first request's timings do not include one-off costs."""
    from ..dllm.generate import generate
    from ..dllm.tokenizer import encode_prompts

    ids, attn = encode_prompts(tokenizer, ["a"], 1)
    generate(model, ids, attention_mask=attn, gen_length=2, steps=1, mask_id=tokenizer.mask_token_id)


# --- input checks -------------------------------------------------------------------------------------------------

def _as_int(name: str, value, low: int, high: Optional[int] = None) -> int:
    """``value`` as an int in ``[low, high]`` (a float with an integer value counts), else gr.Error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value):
        raise _error(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise _error(f"{name} must be {bound}, got {value}")
    return value


def _as_float(name: str, value, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _error(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise _error(f"{name} must be in [{low:g}, {high:g}], got {value:g}")
    return float(value)


def _choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise _error(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _schedule(kind, high, low, k, *, what: str, bounds: tuple[float, float]):
    """A ``ThresholdSchedule`` from the form; ``bounds`` is the range the compared statistic lives in."""
    from ..samplers.schedules import ThresholdSchedule

    kind = _choice(f"{what} schedule kind", kind, SCHEDULE_KINDS)
    high = _as_float(f"{what} threshold 'high'", high, *bounds)
    low = high if kind == "constant" else _as_float(f"{what} threshold 'low'", low, *bounds)
    rate = _as_float("exp decay rate k", k) if kind == "exp" else None
    try:
        return ThresholdSchedule(kind, high, low, k=rate)
    except ValueError as e:
        raise _error(str(e)) from e


# --- images -------------------------------------------------------------------------------------------------------

def _labels(digits, count: int) -> list[int]:
    """``count`` labels cycling through the chosen digits."""
    if not digits:
        raise _error("pick at least one digit class (0-9)")
    chosen = [_as_int("digit class", d, 0, 9) for d in digits]
    return [chosen[i % len(chosen)] for i in range(count)]


def _exit_rule(models: Models, rule: str, threshold, kind, high, low, k, depths: str, budget, setup: dict):
    """``(ExitRule, UEMStack or None)`` from the form; ``setup``: the sampler, steps and guidance scale chosen."""
    from ..uem.exit_rules import FullDepth, StaticDepth, UncertaintyThreshold

    rule = _choice("early-exit rule", rule, IMAGE_RULES)
    if rule == RULE_OFF:
        return FullDepth(), None
    if rule == RULE_CALIBRATED:
        return _calibrated_rule(models, budget, setup), models.uem()
    if rule == RULE_STATIC:
        try:
            parsed = tuple(int(d) for d in str(depths).replace(",", " ").split())
        except ValueError:
            raise _error(f"static depths must be whole numbers of blocks separated by spaces, like '4 8 12'; "
                         f"got {depths!r}") from None
        try:
            return StaticDepth(parsed), None
        except ValueError as e:
            raise _error(str(e)) from e
    if rule == RULE_THRESHOLD:
        value = _as_float("uncertainty threshold", threshold, 0.0, 1.0)
    else:
        value = _schedule(kind, high, low, k, what="uncertainty", bounds=(0.0, 1.0))
    return UncertaintyThreshold(value), models.uem()


def _calibrated_rule(models: Models, budget, setup: dict):
    from ..uem.calibration import Calibration

    files = models.calibrations()
    if not files:
        raise _error("the UEMs have no calibration files beside them; make some with `diffexit calibrate uem --uem "
                     "DIR --budget B`, or pick another rule")
    budget = _choice("exit-error budget", str(budget), tuple(files))
    try:
        return Calibration.load(files[budget]).checked_rule(
            models.pipeline().transformer, models.uem(), steps=setup["steps"], guidance_scale=setup["guidance_scale"],
            scheduler=SAMPLERS[setup["sampler"]])
    except ValueError as e:
        raise _error(str(e)) from e


def describe_exit_rule(rule) -> str:
    """An exit rule in a few words: ``"DeeDiff, threshold 0.1"``, ``"static depth 4/8/12"``, ``"off (full depth)"``."""
    from ..uem.exit_rules import CalibratedThreshold, FullDepth, StaticDepth, UncertaintyThreshold

    if isinstance(rule, FullDepth):
        return "off (full depth)"
    if isinstance(rule, CalibratedThreshold):
        return f"DeeDiff, calibrated to budget {rule.budget:g}"
    if isinstance(rule, StaticDepth):
        return "static depth " + "/".join(map(str, rule.depths))
    if isinstance(rule, UncertaintyThreshold):
        if isinstance(rule.threshold, float):
            return f"DeeDiff, threshold {rule.threshold:g}"
        return f"DeeDiff, {describe_schedule(rule.threshold)}"
    return repr(rule)


def _scheduler(pipe, sampler: str):
    import diffusers

    return getattr(diffusers, SAMPLERS[sampler]).from_config(pipe.scheduler.config)


def _sample(pipe, labels: list[int], steps: int, guidance: float, seed: int) -> tuple[torch.Tensor, float]:
    """``(images [B, C, S, S] in [0, 1], seconds)``; the seed fixes the initial noise (and DDPM's step noise)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    start = time.perf_counter()
    images = pipe(labels, guidance_scale=guidance, generator=generator, num_inference_steps=steps,
                  output_type="pt").images
    return images.cpu(), time.perf_counter() - start


def image_grid(images: torch.Tensor, columns: int = GRID_COLUMNS, cell: int = GRID_CELL_PIXELS) -> np.ndarray:
    """Tile ``images`` ``[B, C, S, S]`` in [0, 1] into one uint8 RGB picture ``[H, W, 3]``.

    Rows of ``columns`` images, each upscaled by an integer factor (nearest) to about ``cell`` pixels, with a
    2-pixel white gutter.
    """
    b, c, s, _ = images.shape
    scale = max(1, cell // s)
    tiles = images.clamp(0, 1).repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    tiles = tiles.expand(b, 3, *tiles.shape[-2:]) if c == 1 else tiles[:, :3]
    cols, size, gap = min(columns, b), s * scale, 2
    rows = math.ceil(b / cols)
    grid = torch.ones(3, rows * (size + gap) + gap, cols * (size + gap) + gap)
    for i, tile in enumerate(tiles):
        r, q = divmod(i, cols)
        y, x = gap + r * (size + gap), gap + q * (size + gap)
        grid[:, y:y + size, x:x + size] = tile
    return (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def depth_heatmap(depth_counts: torch.Tensor, timesteps: torch.Tensor, title: str):
    """A matplotlib figure: sampling step (rows, labelled by timestep) by blocks run (columns), shaded by samples.

    ``depth_counts`` is ``ExitStatistics.depth_counts`` ``[S, L]``; ``timesteps`` is ``[S]``.
    """
    from matplotlib.figure import Figure

    counts = depth_counts.numpy()
    steps, blocks = counts.shape
    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.subplots()
    image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(blocks), [str(d) for d in range(1, blocks + 1)])
    every = max(1, math.ceil(steps / 10))
    rows = list(range(0, steps, every))
    ax.set_yticks(rows, [f"{i + 1} (t={int(timesteps[i])})" for i in rows])
    ax.set_xlabel("blocks run before exiting")
    ax.set_ylabel("sampling step (timestep)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="samples")
    fig.tight_layout()
    return fig


def _psnr(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
    """PSNR in dB of images in [0, 1]; None when they are identical (infinite)."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return None if mse == 0 else 10 * math.log10(1 / mse)


# --- text ---------------------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _task_tags() -> dict[str, str]:
    """``{"add:": "add", ...}``: the tag each task's prompts start with."""
    from ..dllm.tasks import TASK_NAMES, sample

    return {sample(t, "heldout", 0, 1)[0].prompt.split(":", 1)[0] + ":": t for t in TASK_NAMES}


def task_of(prompt: str) -> Optional[str]:
    """The task whose tag ``prompt`` starts with, or None for a free prompt."""
    return next((task for tag, task in _task_tags().items() if prompt.startswith(tag)), None)


def example(task: str, index: int = 0) -> tuple[str, int, int, int]:
    """A held-out example of ``task`` and its decode settings: ``(prompt, gen_length, steps, block_length)``."""
    from ..dllm.tasks import DECODE, TASK_NAMES, layout_of, sample

    task = _choice("task", task, TASK_NAMES)
    index = _as_int("example index", index, 0)
    span = layout_of(task).span_length
    block, steps = DECODE[span]
    return sample(task, "heldout", seed=index, n=1)[0].prompt, span, steps, block


def _prompt_length(tokenizer, prompt: str, task: Optional[str]) -> int:
    """The left-padded prompt length: the task's layout, or for a free prompt the shortest layout that holds it."""
    from ..dllm.tasks import LAYOUTS, layout_of

    if task is not None:
        return layout_of(task).prompt_length
    n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    fits = sorted(lay.prompt_length for lay in LAYOUTS.values() if lay.prompt_length >= n)
    if not fits:
        longest = max(lay.prompt_length for lay in LAYOUTS.values())
        raise _error(f"the prompt is {n} characters; the model reads at most {longest}")
    return fits[0]


def describe_schedule(schedule) -> str:
    """``"cosine 7.5 -> 2.5"``, ``"exp 0.3 -> 0.05 (k=4)"``, ``"constant 0.1"``."""
    if schedule.kind == "constant":
        return f"constant {schedule.high:g}"
    rate = f" (k={schedule.k:g})" if schedule.kind == "exp" else ""
    return f"{schedule.kind} {schedule.high:g} -> {schedule.low:g}{rate}"


def describe_halting(rule) -> str:
    """A halting rule in a few words: ``"SchED, cosine 7.5 -> 2.5, mean"``; None is ``"full steps"``."""
    from ..dllm.halting import Prophet, SchED

    if rule is None:
        return "full steps"
    if isinstance(rule, SchED):
        return f"SchED, {describe_schedule(rule.schedule)}, {rule.stat}"
    if isinstance(rule, Prophet):
        return f"Prophet, {rule.window}-token window, {describe_schedule(rule.schedule)}"
    return repr(rule)


def _halting_rule(name: str, kind, high, low, k, stat):
    """A fresh halting rule from the form (rules keep per-run state), or None for full steps."""
    from ..dllm.halting import STATS, Prophet, SchED

    name = _choice("halting rule", name, HALTING)
    if name == HALT_NONE:
        return None
    if name == HALT_PROPHET:
        return Prophet()
    # Margins are top-1 minus top-2 logits, so never negative: a negative threshold would halt at once.
    schedule = _schedule(kind, high, low, k, what="margin", bounds=(0.0, 1e4))
    return SchED(schedule, stat=_choice("margin statistic", stat, STATS))


@dataclass
class _Decoded:
    """One timed decode of one prompt."""

    out: GenerationOutput
    seconds: float


class _Cancelled(Exception):
    """The request went away; the decode stops at its next forward pass."""


class _Tap:
    """The model as ``generate`` sees it: every forward pass first reports the span it is about to read.

    Args:
        model: the text model (``model(input_ids, attention_mask=...)`` -> ``.logits``).
        prompt_length: where the span starts in ``input_ids``.
        events: gets the span token ids ``list[int]`` of every forward pass (batch of one).
        cancelled: set when nobody is listening any more; the next forward raises ``_Cancelled``.
    """

    def __init__(self, model, prompt_length: int, events: queue.Queue, cancelled: threading.Event):
        self.model, self.config = model, model.config
        self.prompt_length, self.events, self.cancelled = prompt_length, events, cancelled

    def __call__(self, input_ids, **kwargs):
        if self.cancelled.is_set():
            raise _Cancelled
        self.events.put(input_ids[0, self.prompt_length:].tolist())
        return self.model(input_ids, **kwargs)


_DONE = object()


def _decode_streaming(run) -> Generator[tuple[int, list[int]], None, _Decoded]:
    """Run ``run(tap_events, cancelled)`` in a worker thread; yield ``(forward passes so far, latest span)``.

    The first forward pass is reported at once, later ones at most every ``STREAM_INTERVAL`` seconds: spans that
    arrive in between are coalesced into the latest one, so neither the page nor gradio's per-update cost slows
    the decode down. Returns (``yield from``) the worker's result, or raises its exception. When the consumer
    stops early (the request was cancelled), the decode stops at its next forward pass.
    """
    events: queue.Queue = queue.Queue()
    cancelled = threading.Event()
    result: dict = {}

    def work():
        try:
            result["value"] = run(events, cancelled)
        except BaseException as e:  # handed to the consumer, which re-raises it
            result["error"] = e
        finally:
            events.put(_DONE)

    worker = threading.Thread(target=work, name="diffexit-demo-decode", daemon=True)
    worker.start()
    passes, finished = 0, False
    try:
        while not finished:
            batch = [events.get()]
            while True:
                try:
                    batch.append(events.get_nowait())
                except queue.Empty:
                    break
            finished = batch[-1] is _DONE
            spans = [b for b in batch if b is not _DONE]
            if spans:
                passes += len(spans)
                sent_at = time.monotonic()
                yield passes, spans[-1]
                if not finished:
                    time.sleep(max(0.0, STREAM_INTERVAL - (time.monotonic() - sent_at)))
    finally:
        cancelled.set()
        worker.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def _relay(updates, render):
    """Yield ``render(*update)`` for every update of the generator ``updates``; return what it returns."""
    with contextlib.closing(updates):
        while True:
            try:
                update = next(updates)
            except StopIteration as stop:
                return stop.value
            yield render(*update)


def _glyph(tokenizer, token_id: int) -> str:
    if token_id == tokenizer.mask_token_id:
        return MASK_GLYPH
    if token_id == tokenizer.eos_token_id:
        return EOS_GLYPH
    text = tokenizer.convert_ids_to_tokens(token_id)
    return SPACE_GLYPH if text == " " else text


def span_text(tokenizer, span: Sequence[int]) -> str:
    """A span drawn as one string: ``▒`` still masked, ``·`` EOS padding, ``␣`` a space."""
    return "".join(_glyph(tokenizer, t) for t in span)


def _highlighted(tokenizer, span: Sequence[int], previous: Optional[Sequence[int]] = None,
                 filled: Optional[set[int]] = None) -> list[tuple[str, Optional[str]]]:
    """``gr.HighlightedText`` value: each token with its class (masked, new since ``previous``, filled at halt)."""
    out = []
    for i, t in enumerate(span):
        if t == tokenizer.mask_token_id:
            cls = "masked"
        elif filled is not None and i in filled:
            cls = "filled at halt"
        elif previous is not None and previous[i] == tokenizer.mask_token_id:
            cls = "new"
        elif t == tokenizer.eos_token_id:
            cls = "EOS padding"
        else:
            cls = None
        out.append((_glyph(tokenizer, t), cls))
    return out


def trace_plot(trace: list, full_trace: Optional[list], schedule, title: str):
    """A matplotlib figure of the halting statistic against the threshold at every forward pass.

    ``trace`` is the decoded run's ``TraceStep`` list, ``full_trace`` the full-steps run's (None when the decoded
    run is the full-steps run), ``schedule`` the rule's threshold schedule (None without a rule).
    """
    from matplotlib.figure import Figure

    def finite(steps):  # a pass with nothing left masked has an infinite statistic: nothing to draw
        return [t for t in steps if math.isfinite(t.margin)]

    fig = Figure(figsize=(6.4, 3.4), dpi=100)
    ax = fig.subplots()
    if full_trace is not None:
        ax.plot([t.step + 1 for t in finite(full_trace)], [t.margin for t in finite(full_trace)], color="0.6",
                marker=".", label="mean margin, full steps")
    label = "mean margin" if schedule is None else "halting statistic"
    ax.plot([t.step + 1 for t in finite(trace)], [t.margin for t in finite(trace)], color="tab:blue", marker="o",
            label=label)
    if schedule is not None:
        reference = full_trace if full_trace is not None else trace
        ax.plot([t.step + 1 for t in reference], [schedule(t.progress) for t in reference], color="tab:red",
                linestyle="--", label="threshold")
    halted = [t.step + 1 for t in trace if t.halted]
    if halted:
        ax.axvline(halted[0], color="tab:orange", alpha=0.6, label=f"halted at pass {halted[0]}")
    ax.set_xlabel("forward pass")
    ax.set_ylabel("logit margin")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _trace_rows(tokenizer, trace: list) -> list[list]:
    return [[t.step + 1, round(t.progress, 3), round(t.margin, 3) if math.isfinite(t.margin) else None,
             None if t.threshold is None else round(t.threshold, 3), t.committed, t.masked_before,
             "yes" if t.halted else "", span_text(tokenizer, t.tokens)] for t in trace]


TRACE_HEADERS = ["pass", "progress", "statistic", "threshold", "committed", "masked before", "halted", "span after"]


# --- the app ------------------------------------------------------------------------------------------------------

class Demo:
    """The request handlers, bound to one set of models (what ``build_app`` wires to the page)."""

    def __init__(self, models: Models):
        self.models = models

    # images ---------------------------------------------------------------------------------------------------

    def images(self, digits, count, steps, sampler, guidance, rule, threshold, kind, high, low, k, depths, seed,
               budget=None, progress=gr.Progress()):
        """Sample with the chosen exit rule, then the same noise at full depth.

        Returns ``(early-exit grid, full-depth grid, summary markdown, heatmap figure, details dict)``.
        """
        from ..samplers.exit_scheduler import ExitAwareScheduler
        from ..uem.early_exit import disable_early_exit, enable_early_exit

        count = _as_int("number of images", count, 1, MAX_IMAGES)
        labels = _labels(digits, count)
        steps = _as_int("sampling steps", steps, 1, MAX_IMAGE_STEPS)
        sampler = _choice("sampler", sampler, tuple(SAMPLERS))
        guidance = _as_float("guidance scale", guidance, 0.0, 20.0)
        seed = _as_int("seed", seed, 0, 2**63 - 1)
        exit_rule, uem = _exit_rule(self.models, rule, threshold, kind, high, low, k, depths, budget,
                                    {"steps": steps, "guidance_scale": guidance, "sampler": sampler})
        pipe = self.models.pipeline()

        with self.models.image_run_lock:
            original = pipe.scheduler
            try:
                early_exit = enable_early_exit(pipe, uem, exit_rule)
            except ValueError as e:
                raise _error(str(e)) from e
            try:
                progress(0.0, desc="sampling with early exits")
                pipe.scheduler = ExitAwareScheduler(_scheduler(pipe, sampler), early_exit)
                # Early exits run first, so the first call's warm-up counts against them, not for them.
                early, early_s = _sample(pipe, labels, steps, guidance, seed)
                stats = pipe.scheduler.statistics
            finally:
                pipe.scheduler = original
                disable_early_exit(pipe)
            progress(0.5, desc="sampling at full depth")
            pipe.scheduler = _scheduler(pipe, sampler)
            try:
                full, full_s = _sample(pipe, labels, steps, guidance, seed)
            finally:
                pipe.scheduler = original

        blocks_run, available = int(stats.depths.sum()), stats.num_blocks * stats.depths.numel()
        psnr = _psnr(early, full)
        details = {
            "labels": labels, "steps": steps, "sampler": sampler, "guidance_scale": guidance, "seed": seed,
            "rule": describe_exit_rule(exit_rule), "num_blocks": stats.num_blocks,
            "layer_ratio": stats.layer_ratio, "blocks_run": blocks_run, "blocks_available": available,
            "seconds_early_exit": early_s, "seconds_full_depth": full_s, "speedup_wall": full_s / early_s,
            "psnr_db": psnr, "timesteps": stats.timesteps.tolist(), "depth_counts": stats.depth_counts.tolist(),
        }
        quality = "identical to full depth" if psnr is None else f"PSNR {psnr:.1f} dB against full depth"
        summary = (
            f"**Layer ratio {stats.layer_ratio:.3f}**: {blocks_run} of {available} blocks "
            f"({steps} steps x {count} images x {stats.num_blocks} blocks). "
            f"Early exits {early_s:.2f} s, full depth {full_s:.2f} s: **{full_s / early_s:.2f}x** wall-clock. "
            f"{quality}."
        )
        figure = depth_heatmap(stats.depth_counts, stats.timesteps,
                               f"{describe_exit_rule(exit_rule)}: layer ratio {stats.layer_ratio:.2f}")
        return image_grid(early), image_grid(full), summary, figure, details

    # text -----------------------------------------------------------------------------------------------------

    def text(self, prompt, gen_length, steps, block_length, halting, kind, high, low, k, stat):
        """Decode ``prompt`` under the halting rule, streaming each forward pass; then full steps to compare.

        Yields ``(answer, summary markdown, span highlights, trace figure, trace table, details dict)``; updates
        while decoding carry only the status and the span (the answer is empty, the rest None).
        """
        from ..dllm.generate import generate
        from ..dllm.tasks import score
        from ..dllm.tokenizer import decode_answer, encode_prompts

        if not isinstance(prompt, str) or not prompt.strip():
            raise _error("the prompt is empty: type one, or pick a task to get an example")
        gen_length = _as_int("generation length", gen_length, 1)
        steps = _as_int("steps", steps, 1, MAX_TEXT_STEPS)
        block_length = _as_int("block length", block_length, 1)
        rule = _halting_rule(halting, kind, high, low, k, stat)
        model, tok = self.models.text()

        unknown = sorted({c for c in prompt if tok.convert_tokens_to_ids(c) == tok.unk_token_id})
        if unknown:
            raise _error(f"the prompt has characters the model cannot read: {''.join(unknown)!r}; "
                         f"it reads printable ASCII only")
        task = task_of(prompt)
        prompt_length = _prompt_length(tok, prompt, task)
        positions = model.config.max_position_embeddings
        if prompt_length + gen_length > positions:
            raise _error(f"generation length {gen_length} does not fit the model: the prompt takes "
                         f"{prompt_length} positions and the model has {positions}, so the longest generation "
                         f"is {positions - prompt_length}")
        try:
            ids, attn = encode_prompts(tok, [prompt], prompt_length)
        except ValueError as e:  # longer than the task's prompt layout
            raise _error(str(e)) from e

        def decode(halting_rule):
            def run(events, cancelled):
                start = time.perf_counter()
                out = generate(_Tap(model, prompt_length, events, cancelled), ids, attention_mask=attn,
                               gen_length=gen_length, steps=steps, block_length=block_length,
                               mask_id=tok.mask_token_id, halting=halting_rule, return_trace=True)
                return _Decoded(out, time.perf_counter() - start)

            return run

        name = describe_halting(rule)
        shown: list = [None]  # the span on the page, so the next update can mark what is new

        # While decoding, the previous request's results are cleared: only the status and the span show.
        def live(passes, span):
            value, shown[0] = _highlighted(tok, span, shown[0]), span
            return "", f"Decoding with {name}: forward pass {passes} (at most {steps}).", value, None, None, None

        def comparing(passes, span):
            # Drawn like the halted run's updates, so both timed decodes share the page's overhead alike.
            value, shown[0] = _highlighted(tok, span, shown[0]), span
            status = (f"Halted after {int(decoded.out.nfe[0])} forward passes. Decoding with full steps to compare: "
                      f"pass {passes} of {steps}.")
            return "", status, value, None, None, None

        try:
            decoded = yield from _relay(_decode_streaming(decode(rule)), live)
            full = decoded if rule is None else (yield from _relay(_decode_streaming(decode(None)), comparing))
        except ValueError as e:  # generate's checks: block length, steps per block, ...
            raise _error(str(e)) from e

        out, trace = decoded.out, decoded.out.trace[0]
        answer = decode_answer(tok, out.generated[0])
        full_answer = decode_answer(tok, full.out.generated[0])
        nfe, full_nfe = int(out.nfe[0]), int(full.out.nfe[0])
        halt_step = int(out.halt_step[0])
        filled = None
        if halt_step >= 0:
            before = trace[halt_step - 1].tokens if halt_step > 0 else [tok.mask_token_id] * gen_length
            filled = {i for i, t in enumerate(before) if t == tok.mask_token_id}
        valid = full_valid = None
        if task is not None:
            try:
                valid, full_valid = score(task, prompt, answer), score(task, prompt, full_answer)
            except ValueError:  # a prompt with a task's tag that is not well formed: nothing to score against
                pass
        details = {
            "task": task, "prompt_length": prompt_length, "gen_length": gen_length, "steps": steps,
            "block_length": block_length, "halting": name, "answer": answer, "nfe": nfe, "halt_step": halt_step,
            "full_steps_answer": full_answer, "full_steps_nfe": full_nfe, "speedup_nfe": full_nfe / nfe,
            "seconds": decoded.seconds, "seconds_full_steps": full.seconds,
            "speedup_wall": full.seconds / decoded.seconds, "valid": valid, "full_steps_valid": full_valid,
        }
        yield (answer, _text_summary(details), _highlighted(tok, out.generated[0].tolist(), filled=filled),
               trace_plot(trace, None if rule is None else full.out.trace[0],
                          None if rule is None else rule.schedule,
                          f"{name}: {nfe} of {full_nfe} forward passes"),
               _trace_rows(tok, trace), details)


def _text_summary(d: dict) -> str:
    def verdict(valid):
        return "" if valid is None else (" (a right answer)" if valid else " (not a right answer)")

    head = f"Answer `{d['answer']}`{verdict(d['valid'])}."
    if d["halting"] == "full steps":
        return f"{head} **NFE {d['nfe']}**: full steps, no halting rule ({d['seconds']:.2f} s)."
    halted = f"halted at pass {d['halt_step'] + 1}" if d["halt_step"] >= 0 else "never halted"
    same = ("the same answer" if d["answer"] == d["full_steps_answer"]
            else f"`{d['full_steps_answer']}`{verdict(d['full_steps_valid'])}")
    return (
        f"{head} **NFE {d['nfe']}** against {d['full_steps_nfe']} for full steps: **{d['speedup_nfe']:.2f}x fewer "
        f"forward passes**, {d['speedup_wall']:.2f}x wall-clock ({d['seconds']:.2f} s against "
        f"{d['seconds_full_steps']:.2f} s); {halted}. Full steps give {same}."
    )


INTRO = """# diffexit demo
Cheaper diffusion sampling by stopping work that no longer changes the answer.
**Images:** DeeDiff early exits skip the last transformer blocks once the model is certain enough.
**Text:** SchED halts a masked-diffusion LM's decoding once the span's logit margin clears a falling threshold.
Everything runs locally on CPU; nothing leaves this machine."""


def build_app(text_model: Optional[str | Path] = None, image_pipeline: Optional[str | Path] = None,
              uem: Optional[str | Path] = None) -> gr.Blocks:
    """The demo as a ``gr.Blocks`` with its queue set up; nothing is loaded until a request needs it.

    Args: as :class:`Models` (paths; None means the embedded model). Serve it with :func:`launch`.

    API endpoints (``gradio_client``): ``/images``, ``/text`` (a generator: intermediate results stream) and
    ``/example``.
    """
    from ..dllm.tasks import TASK_NAMES

    # Gradio reads this at every analytics call; the demo must never phone home, whoever builds it.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    path = lambda p: None if p is None else Path(p)
    models = Models(path(text_model), path(image_pipeline), path(uem))
    demo = Demo(models)
    first_task = TASK_NAMES[0]
    first = example(first_task)

    # Number fields carry no minimum/maximum: gradio's own bound check does not say which field is wrong, and the
    # handlers' checks do. Sliders keep their bounds, which the page enforces.
    with gr.Blocks(title="diffexit demo", analytics_enabled=False) as app:
        gr.Markdown(INTRO)
        gr.Markdown(models.describe())
        with gr.Tab("Images: DeeDiff early exits", id="images"):
            with gr.Row():
                with gr.Column(scale=1, min_width=300):
                    digits = gr.CheckboxGroup([(str(d), d) for d in range(10)], value=[0, 1, 2, 3, 4, 5, 6, 7],
                                              label="digit classes", info="images cycle through these")
                    count = gr.Slider(1, MAX_IMAGES, value=8, step=1, label="number of images")
                    steps = gr.Slider(1, MAX_IMAGE_STEPS, value=25, step=1, label="sampling steps")
                    sampler = gr.Dropdown(list(SAMPLERS), value="DDIM", label="sampler")
                    guidance = gr.Slider(0.0, 8.0, value=2.0, step=0.5, label="guidance scale",
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
                    # The middle budget: the shipped heads' 0.02, the best trade-off in `diffexit bench images`.
                    budget = gr.Dropdown(budgets, value=budgets[(len(budgets) - 1) // 2] if budgets else None,
                                         label="exit-error budget", visible=first_rule == RULE_CALIBRATED,
                                         info="mean change per step of the sample (pixels in [-1, 1]) that the "
                                              "calibrated thresholds allow", elem_id="budget")
                    depths = gr.Textbox("4 8 12", label="static depths", visible=first_rule == RULE_STATIC,
                                        info="blocks to run per equal stretch of sampling, noisiest first",
                                        elem_id="depths")
                    seed = gr.Number(0, precision=0, label="seed")
                    run_images = gr.Button("Generate", variant="primary", elem_id="run-images")
                with gr.Column(scale=2):
                    with gr.Row():
                        early_grid = gr.Image(label="early exits", format="png", type="numpy",
                                              interactive=False, elem_id="early-grid")
                        full_grid = gr.Image(label="full depth, same noise", format="png", type="numpy",
                                             interactive=False, elem_id="full-grid")
                    image_summary = gr.Markdown(elem_id="image-summary")
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
                [digits, count, steps, sampler, guidance, rule, threshold, kind, high, low, k, depths, seed, budget],
                [early_grid, full_grid, image_summary, heatmap, image_details],
                api_name="images", concurrency_limit=1, concurrency_id="images",
            )

        with gr.Tab("Text: SchED halting", id="text"):
            with gr.Row():
                with gr.Column(scale=1, min_width=300):
                    with gr.Row():
                        task = gr.Dropdown(list(TASK_NAMES), value=first_task, label="task preset",
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
                        stat = gr.Dropdown(["mean", "median", "quantile", "min"], value="mean",
                                           label="statistic over the masked span",
                                           info="mean: the paper's; quantile: the 10% quantile")
                    run_text = gr.Button("Decode", variant="primary", elem_id="run-text")
                with gr.Column(scale=2):
                    answer = gr.Textbox(label="answer", interactive=False, elem_id="answer")
                    text_summary = gr.Markdown(elem_id="text-summary")
                    span = gr.HighlightedText(label="span (streams while decoding)", color_map=SPAN_COLORS,
                                              show_legend=True, combine_adjacent=False, elem_id="span")
                    trace = gr.Plot(label="margin against threshold", format="png", elem_id="trace")
                    with gr.Accordion("the span after every forward pass", open=False):
                        steps_table = gr.Dataframe(headers=TRACE_HEADERS, label="decoding trace", wrap=True,
                                                   interactive=False)
                    with gr.Accordion("measurements", open=False):
                        text_details = gr.JSON(label="details")

            def preset(task_name, i=0):
                return (i, *example(task_name, i))

            preset_outputs = [index, prompt, gen_length, text_steps, block_length]
            task.change(preset, task, preset_outputs, api_name="example")
            another.click(lambda t, i: preset(t, i + 1), [task, index], preset_outputs, api_visibility="private")
            halting.change(lambda h: gr.update(visible=h == HALT_SCHED), halting, sched_group, queue=False,
                           api_visibility="private")
            run_text.click(
                demo.text,
                [prompt, gen_length, text_steps, block_length, halting, sched_kind, sched_high, sched_low, sched_k,
                 stat],
                [answer, text_summary, span, trace, steps_table, text_details],
                api_name="text",
            )

    app.queue(default_concurrency_limit=TEXT_CONCURRENCY, max_size=MAX_QUEUE)
    return app


THEME_FONTS = ["ui-sans-serif", "system-ui", "DejaVu Sans", "sans-serif"]
THEME_MONO = ["ui-monospace", "DejaVu Sans Mono", "monospace"]


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: Optional[int] = None, *, block: bool = True):
    """Serve ``app`` on ``host:port``: never shared publicly, client-side rendering, system fonts (no font CDN).

    With ``block=False`` it returns once the server is up (``app.close()`` stops it).
    """
    theme = gr.themes.Default(font=THEME_FONTS, font_mono=THEME_MONO)
    return app.launch(
        server_name=host, server_port=port, share=False, prevent_thread_lock=not block, inbrowser=False,
        quiet=not block, ssr_mode=False, mcp_server=False, enable_monitoring=False, pwa=False, theme=theme,
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
        prog=prog,
        description="The Gradio demo: DeeDiff early exits on images and SchED halting on text, side by side with "
                    "full depth / full steps. Local only: binds 127.0.0.1 by default, never shares publicly, "
                    "sends no analytics.",
    )
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s; 0.0.0.0 exposes the demo to your network)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument("--text-model", metavar="PATH",
                   help="an exported text model folder (from `diffexit train text --export`); default: embedded")
    p.add_argument("--image-pipeline", metavar="DIR",
                   help="a DigitsDiTPipeline folder (from `diffexit train image --export`); default: embedded")
    p.add_argument("--uem", metavar="DIR",
                   help="UEM weights for the image pipeline's transformer (RUN/uem from `diffexit train uem "
                        "--out RUN`); needed by the DeeDiff rules")
    args = p.parse_args(list(argv))
    if not 0 < args.port < 65536:
        p.error(f"--port must be in 1..65535, got {args.port}")
    text = _model_dir(p, "--text-model", args.text_model, "config.json",
                      "give the folder that `diffexit train text --export DIR` wrote")
    image = _model_dir(p, "--image-pipeline", args.image_pipeline, "model_index.json",
                       "give a DigitsDiTPipeline folder (`diffexit train image --export DIR`)")
    uem = _model_dir(p, "--uem", args.uem, "config.json",
                     "give the uem/ folder inside the run (`diffexit train uem --out RUN` writes RUN/uem)")
    app = build_app(text, image, uem)
    launch(app, args.host, args.port, block=True)
    return 0
