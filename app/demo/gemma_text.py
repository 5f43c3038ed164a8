"""The demo's text tab when the text model is a DiffusionGemma: one prompt decoded under a stopping rule by the
model's own encoder, decoder and sampling in diffexit's loop (``diffexit.dllm.gemma_loop.decode``, which equals
``generate``), streamed denoising step by step, then with every step to compare.

The rules: SchED (:class:`~diffexit.dllm.diffusion_gemma.SchEDStopping`, a canvas statistic against a schedule
over the canvas's denoising progress), the learned rule shipped beside the model's weights
(:class:`~diffexit.dllm.gemma_commit.LearnedStopping`, its least token probability of being final against its
calibrated threshold), transformers' stock ``StableAndConfidentStoppingCriteria`` (the argmax
stable for one step and the mean token entropy under a confidence threshold), or none (every step). The model
samples; both decodes seed each canvas from ``SEED`` and its index (``canvas_seed``), so they differ only where the
rule stopped a canvas.

Each decode gets its own rule object; DiffusionGemma decodes still take the model's lock one at a time, so two
requests never split the machine's cores between them.
"""

from __future__ import annotations

import time
from typing import Optional

from ...dllm.statistics import CANVAS, check_stat
from .forms import MAX_TEXT_STEPS, _as_float, _as_int, _choice, _error, _schedule
from .models import Models
from .streaming import Decoded, DraftTap, decode_streaming, relay
from .text import EOS_GLYPH, SPACE_GLYPH, scored, task_of, threshold_bounds, verdict

STOP_SCHED, STOP_LEARNED = "SchED", "learned (the model's commit rule)"
STOP_STOCK, STOP_NONE = "stock (stable and confident)", "none (all steps)"
STOPPING = (STOP_SCHED, STOP_LEARNED, STOP_STOCK, STOP_NONE)
SEED = 0
UNKNOWN_GLYPH = "\ufffd"
GEMMA_SPAN_COLORS = {"changed": "#86efac", "stopped early": "#fcd34d", "EOS padding": "#e0e7ff"}
GEMMA_TRACE_HEADERS = ["pass", "canvas", "step", "statistic", "threshold", "stopped", "canvas argmax"]


def gemma_example(task: str, index: int, canvas_length: int) -> tuple[str, int, int]:
    """A held-out example of ``task`` and its decode settings for a DiffusionGemma: ``(prompt, tokens to generate,
    denoising steps per canvas)``: the answer span in whole canvases, one step per canvas token."""
    from ...dllm.charlm.gemma import gemma_span
    from ...dllm.charlm.tasks import TASK_NAMES, layout_of, sample

    task = _choice("task", task, TASK_NAMES)
    index = _as_int("example index", index, 0)
    return sample(task, "heldout", seed=index, n=1)[0].prompt, gemma_span(layout_of(task), canvas_length), \
        canvas_length


def _traced_learned(threshold=None):
    """The shipped learned rule, keeping each call's statistic (the canvas's least probability of a token being final)
    in ``history`` for the trace: the demo decodes one sample, so one value a step."""
    from ...dllm.gemma_commit import LearnedStopping

    class Traced(LearnedStopping):
        def __init__(self, threshold):
            super().__init__(threshold=threshold)
            self.history: list[float] = []

        def begin(self, total_steps: int) -> None:
            super().begin(total_steps)
            self.history = []

        def __call__(self, argmax_canvas, logits, **kwargs):
            stop = super().__call__(argmax_canvas, logits, **kwargs)
            self.history.append(float(self.least[0]))
            return stop

    return Traced(threshold=threshold)


def stopping_from_form(name, kind, high, low, k, stat, confidence):
    """``(SchEDStopping, the learned rule or None, stock confidence threshold or None)`` from the form; both None:
    every step."""
    from ...dllm.diffusion_gemma import SchEDStopping

    name = _choice("stopping rule", name, STOPPING)
    if name == STOP_NONE:
        return None, None
    if name == STOP_LEARNED:
        return _traced_learned(), None
    if name == STOP_STOCK:
        return None, _as_float("confidence threshold", confidence, 0.0)
    try:
        entry = check_stat(stat, CANVAS)
    except ValueError as e:
        raise _error(str(e)) from e
    schedule = _schedule(kind, high, low, k, what=entry.reads, bounds=threshold_bounds(entry))
    return SchEDStopping(schedule, stat=stat), None


def _describe(rule, stock: Optional[float]) -> str:
    if hasattr(rule, "history"):
        return "learned rule, its calibrated threshold"
    if rule is not None:
        return f"SchED, {rule.schedule.describe()}, {rule.stat}"
    return "all steps" if stock is None else f"stock, confidence {stock:g}"


def _encode(tok, prompt: str, task: Optional[str]):
    """``(input_ids, attention_mask)`` ``[1, P]``: a task prompt left-padded to its layout (as the model was trained),
    any other prompt through the tokenizer's chat template."""
    import torch

    from ...dllm.charlm.tasks import layout_of
    from ...dllm.charlm.tokenizer import encode_prompts

    if task is not None:
        try:
            return encode_prompts(tok, [prompt], layout_of(task).prompt_length)
        except ValueError as e:  # longer than the task's prompt layout
            raise _error(str(e)) from e
    if getattr(tok, "chat_template", None) is None:
        raise _error("the tokenizer has no chat template, so only prompts of an embedded task can be decoded")
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
                                  return_dict=True, return_tensors="pt")["input_ids"]
    return ids, torch.ones_like(ids)


def _glyph(tok, token_id: int) -> str:
    if token_id in (tok.eos_token_id, tok.pad_token_id):
        return EOS_GLYPH
    text = tok.convert_ids_to_tokens(token_id)
    # One character per token, so the canvases line up: other special tokens, and ids past the tokenizer's (the
    # image tokens a DiffusionGemma reserves), are drawn alike.
    if text is None or token_id in tok.all_special_ids:
        return UNKNOWN_GLYPH
    return SPACE_GLYPH if text == " " else text


def _highlighted(tok, tokens, previous=None, stopped: Optional[set[int]] = None) -> list[tuple[str, Optional[str]]]:
    """``gr.HighlightedText`` value: each token with its class (changed since ``previous``, in a canvas that stopped
    early, EOS padding)."""
    out = []
    for i, t in enumerate(tokens):
        if t in (tok.eos_token_id, tok.pad_token_id):
            cls = "EOS padding"
        elif stopped is not None and i in stopped:
            cls = "stopped early"
        elif previous is not None and (i >= len(previous) or previous[i] != t):
            cls = "changed"
        else:
            cls = None
        out.append((_glyph(tok, t), cls))
    return out


def _trace(tap: DraftTap, rule, stock: Optional[float], steps: int) -> list[dict]:
    """Per denoising step: its canvas and step, the statistic the rule reads (the stock rule's mean token entropy;
    the learned rule's least probability, which it recorded; the mean margin without a rule), the threshold, whether the canvas stopped there before its last step, and the
    canvas's argmax."""
    from ...common.schedules import progress
    from ...kernels import token_stats

    passes_in: dict[int, int] = {}
    for canvas, _, _ in tap.drafts:
        passes_in[canvas] = passes_in.get(canvas, 0) + 1
    rows = []
    for i, (canvas, step, logits) in enumerate(tap.drafts):
        threshold = None
        if hasattr(rule, "history"):
            statistic, threshold = rule.history[i], rule.threshold
        elif stock is not None:
            statistic, threshold = float(token_stats(logits).entropy.mean()), stock
        elif rule is not None:
            statistic = float(rule.statistic(logits[None])[0])
            threshold = rule.schedule(progress(min(step, steps - 1), steps))
        else:
            statistic = float(token_stats(logits).logit_margin.mean())
        rows.append({"canvas": canvas, "step": step, "statistic": statistic, "threshold": threshold,
                     "stopped": step == passes_in[canvas] - 1 and passes_in[canvas] < steps,
                     "tokens": logits.argmax(-1).tolist()})
    return rows


def trace_plot(trace: list[dict], full_trace: Optional[list[dict]], stock: bool, title: str):
    """A matplotlib figure of the statistic at every decoder pass, against the threshold when there is one; dotted
    lines part the canvases."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.4), dpi=100)
    ax = fig.subplots()
    what = "mean token entropy (stops below)" if stock else "canvas statistic"
    if full_trace is not None:
        ax.plot(range(1, len(full_trace) + 1), [r["statistic"] for r in full_trace], color="0.6", marker=".",
                label=f"{what}, all steps")
    ax.plot(range(1, len(trace) + 1), [r["statistic"] for r in trace], color="tab:blue", marker="o", label=what)
    if any(r["threshold"] is not None for r in trace):
        ax.plot(range(1, len(trace) + 1), [r["threshold"] for r in trace], color="tab:red", linestyle="--",
                label="threshold")
    for i, r in enumerate(trace[1:], start=2):
        if r["step"] == 0:
            ax.axvline(i - 0.5, color="0.8", linestyle=":")
    stops = [i for i, r in enumerate(trace, start=1) if r["stopped"]]
    for j, i in enumerate(stops):
        ax.axvline(i, color="tab:orange", alpha=0.6, label="canvas stopped" if j == 0 else None)
    ax.set_xlabel("decoder pass")
    ax.set_ylabel("entropy (nats)" if stock else "statistic")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _trace_rows(tok, trace: list[dict]) -> list[list]:
    return [[i, r["canvas"] + 1, r["step"] + 1, round(r["statistic"], 4),
             None if r["threshold"] is None else round(r["threshold"], 4), "yes" if r["stopped"] else "",
             "".join(_glyph(tok, t) for t in r["tokens"])] for i, r in enumerate(trace, start=1)]


def run_gemma_text(models: Models, prompt, gen_length, steps, stopping, kind, high, low, k, stat, confidence):
    """Decode ``prompt`` with the DiffusionGemma under the stopping rule (``gemma_loop.decode``), streaming each
    denoising step; then every step to compare.

    Yields ``(answer, summary markdown, span highlights, trace figure, trace table, details dict)``; updates while
    decoding carry only the status and the span (the answer is empty, the rest None).
    """
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import StableAndConfidentStoppingCriteria

    from ...dllm.charlm.tokenizer import decode_answer
    from ...dllm.gemma_loop import decode as gemma_loop_decode

    if not isinstance(prompt, str) or not prompt.strip():
        raise _error("the prompt is empty: type one, or pick a task to get an example")
    gen_length = _as_int("generation length", gen_length, 1)
    steps = _as_int("denoising steps", steps, 1, MAX_TEXT_STEPS)
    rule, stock = stopping_from_form(stopping, kind, high, low, k, stat, confidence)
    model, tok = models.text()
    if tok.unk_token_id is not None:
        unknown = sorted({c for c in prompt if tok.convert_tokens_to_ids(c) == tok.unk_token_id})
        if unknown:
            raise _error(f"the prompt has characters the model cannot read: {''.join(unknown)!r}")
    task = task_of(prompt)
    ids, mask = _encode(tok, prompt, task)
    canvas = model.config.canvas_length
    length = ids.shape[1] + -(-gen_length // canvas) * canvas
    positions = model.config.text_config.max_position_embeddings
    if length > positions:
        raise _error(f"generation length {gen_length} does not fit the model: the prompt takes {ids.shape[1]} "
                     f"positions, the answer whole canvases of {canvas}, and the model has {positions}")

    def decode(rule_for_run, stock_for_run):
        if stock_for_run is not None:
            rule_for_run = StableAndConfidentStoppingCriteria(1, stock_for_run)
        kwargs = {} if rule_for_run is not None else {"confidence_threshold": None}

        def run(events, cancelled):
            tap = DraftTap(events, cancelled)
            with models.gemma_lock:
                start = time.perf_counter()
                out = gemma_loop_decode(model, ids, attention_mask=mask, stopping=rule_for_run, seeds=[SEED],
                                        streamer=tap, max_new_tokens=gen_length, max_denoising_steps=steps, **kwargs)
                return Decoded((out, tap), time.perf_counter() - start)

        return run

    name = _describe(rule, stock)
    shown: list = [None]

    def live(passes, tokens):
        value, shown[0] = _highlighted(tok, tokens, shown[0]), tokens
        return "", f"Decoding with {name}: decoder pass {passes}.", value, None, None, None

    def comparing(passes, tokens):
        value, shown[0] = _highlighted(tok, tokens, shown[0]), tokens
        return "", f"Stopped after {passes_of(decoded)} decoder passes. All steps to compare: pass {passes}.", \
            value, None, None, None

    def passes_of(result):
        return int(result.out[0].passes[0])

    try:
        decoded = yield from relay(decode_streaming(decode(rule, stock)), live)
        plain = rule is None and stock is None
        # The learned rule's statistic depends on each token's history, so the all-steps run records it with a
        # rule that never stops (threshold 1: all steps exactly, tests/test_gemma_commit.py).
        full_rule = _traced_learned(1.0) if hasattr(rule, "history") else None
        full = decoded if plain else (yield from relay(decode_streaming(decode(full_rule, None)), comparing))
    except ValueError as e:
        raise _error(str(e)) from e

    def answer_of(result):
        new = result.out[0].sequences[0, ids.shape[1]:]
        return decode_answer(tok, new) if task is not None else tok.decode(new, skip_special_tokens=True)

    if hasattr(rule, "history"):  # bound while decoding, so its calibrated threshold is known now
        name = f"learned rule, threshold {rule.threshold:g}"
    trace = _trace(decoded.out[1], rule, stock, steps)
    full_trace = None if plain else _trace(full.out[1], full_rule or rule, stock, steps)
    answer, full_answer = answer_of(decoded), answer_of(full)
    passes, full_passes = passes_of(decoded), passes_of(full)
    new_tokens = decoded.out[0].sequences[0, ids.shape[1]:].tolist()
    stopped = {r["canvas"] * canvas + i for r in trace if r["stopped"] for i in range(canvas)}
    valid, full_valid = scored(task, prompt, answer, full_answer)
    details = {
        "task": task, "prompt_length": ids.shape[1], "gen_length": gen_length, "steps": steps,
        "canvas_length": canvas, "stopping": name, "seed": SEED, "answer": answer, "passes": passes,
        "canvas_stops": [r["step"] for r in trace if r["stopped"]], "full_steps_answer": full_answer,
        "full_steps_passes": full_passes, "speedup_passes": full_passes / passes, "seconds": decoded.seconds,
        "seconds_full_steps": full.seconds, "speedup_wall": full.seconds / decoded.seconds, "valid": valid,
        "full_steps_valid": full_valid,
    }
    yield (answer, _summary(details), _highlighted(tok, new_tokens, stopped=stopped),
           trace_plot(trace, full_trace, stock is not None, f"{name}: {passes} of {full_passes} decoder passes"),
           _trace_rows(tok, trace), details)


def _summary(d: dict) -> str:
    head = f"Answer `{d['answer']}`{verdict(d['valid'])}."
    if d["stopping"] == "all steps":
        return f"{head} **{d['passes']} decoder passes**: every denoising step, no stopping rule ({d['seconds']:.2f} s)."
    stops = ", ".join(f"step {s + 1}" for s in d["canvas_stops"]) or "none"
    same = ("the same answer" if d["answer"] == d["full_steps_answer"]
            else f"`{d['full_steps_answer']}`{verdict(d['full_steps_valid'])}")
    return (
        f"{head} **{d['passes']} decoder passes** against {d['full_steps_passes']} for all steps: "
        f"**{d['speedup_passes']:.2f}x fewer**, {d['speedup_wall']:.2f}x wall-clock ({d['seconds']:.2f} s against "
        f"{d['seconds_full_steps']:.2f} s); canvases stopped early at {stops} of {d['steps']}. All steps give "
        f"{same} (sampling seeded {d['seed']} in both)."
    )
