"""The demo's text tab: one prompt decoded under a halting rule, streamed pass by pass, then full steps to compare."""

from __future__ import annotations

import math
import time
from functools import lru_cache
from typing import Optional, Sequence

from ...dllm.decode_spec import DecodeSpec
from ...dllm.rule_spec import check_halting_params, describe_halting, halting_rule, halting_spec
from ...dllm.statistics import SPAN, Statistic, check_stat
from .forms import CACHE_NONE, MAX_TEXT_STEPS, _as_int, _choice, _error, _schedule
from .models import Models
from .streaming import Decoded, Tap, decode_streaming, relay

HALT_SCHED, HALT_PROPHET, HALT_NONE = "SchED", "Prophet", "none (full steps)"
HALTING = (HALT_SCHED, HALT_PROPHET, HALT_NONE)
# How a span token is drawn: a still-masked position, EOS padding and a space would be invisible otherwise.
MASK_GLYPH, EOS_GLYPH, SPACE_GLYPH = "▒", "·", "␣"
SPAN_COLORS = {"masked": "#d4d4d8", "new": "#86efac", "filled at halt": "#fcd34d", "EOS padding": "#e0e7ff"}
TRACE_HEADERS = ["pass", "progress", "statistic", "threshold", "committed", "masked before", "halted", "span after"]
# The form's thresholds stay within this magnitude: far beyond any margin or entropy a model gives.
MAX_THRESHOLD = 1e4


@lru_cache(maxsize=1)
def _task_tags() -> dict[str, str]:
    """``{"add:": "add", ...}``: the tag each task's prompts start with."""
    from ...dllm.charlm.tasks import TASK_NAMES, sample

    return {sample(t, "heldout", 0, 1)[0].prompt.split(":", 1)[0] + ":": t for t in TASK_NAMES}


def task_of(prompt: str) -> Optional[str]:
    """The task whose tag ``prompt`` starts with, or None for a free prompt."""
    return next((task for tag, task in _task_tags().items() if prompt.startswith(tag)), None)


# The task the text tab opens on: one that full steps answer and one step gets wrong (the shipped model's card),
# so the first run shows what halting too early costs.
FIRST_TASK = "pick"


def example(task: str, index: int = 0) -> tuple[str, int, int, int]:
    """A held-out example of ``task`` and its decode settings: ``(prompt, gen_length, steps, block_length)``."""
    from ...dllm.charlm.tasks import DECODE, TASK_NAMES, layout_of, sample

    task = _choice("task", task, TASK_NAMES)
    index = _as_int("example index", index, 0)
    span = layout_of(task).span_length
    block, steps = DECODE[span]
    return sample(task, "heldout", seed=index, n=1)[0].prompt, span, steps, block


def _prompt_length(tokenizer, prompt: str, task: Optional[str]) -> int:
    """The left-padded prompt length: the task's layout, or for a free prompt the shortest layout that holds it."""
    from ...dllm.charlm.tasks import LAYOUTS, layout_of

    if task is not None:
        return layout_of(task).prompt_length
    n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    fits = sorted(lay.prompt_length for lay in LAYOUTS.values() if lay.prompt_length >= n)
    if not fits:
        longest = max(lay.prompt_length for lay in LAYOUTS.values())
        raise _error(f"the prompt is {n} characters; the model reads at most {longest}")
    return fits[0]


def threshold_bounds(stat: Statistic) -> tuple[float, float]:
    """The thresholds the form takes for ``stat``: its table range (margins >= 0, minus an entropy <= 0, so a
    threshold of the wrong sign would halt at once or never), cut at :data:`MAX_THRESHOLD`."""
    low, high = stat.bounds
    return max(low, -MAX_THRESHOLD), min(high, MAX_THRESHOLD)


def halting_from_form(name: str, kind, high, low, k, stat, tokenizer):
    """A fresh halting rule from the form (rules keep per-run state), or None for full steps; ``mean_content``
    leaves out the tokenizer's EOS and padding."""
    name = _choice("halting rule", name, HALTING)
    if name == HALT_NONE:
        return None
    if name == HALT_PROPHET:
        return halting_rule("prophet", {})
    try:
        entry = check_stat(stat, SPAN)
    except ValueError as e:
        raise _error(str(e)) from e
    schedule = _schedule(kind, high, low, k, what=entry.reads, bounds=threshold_bounds(entry))
    try:
        return halting_rule("sched", check_halting_params(
            "sched", {"schedule": schedule.to_dict(), "stat": stat},
            ignore_token_ids=(tokenizer.eos_token_id, tokenizer.pad_token_id)))
    except ValueError as e:
        raise _error(str(e)) from e


def spec_from_form(gen_length: int, steps: int, block_length: int, halting: str, rule, cache,
                   parallel) -> DecodeSpec:
    """The :class:`~diffexit.dllm.decode_spec.DecodeSpec` the form names, checked by the spec itself, so a bad
    option gets the message ``generate text`` gives. ``halting``: the form's rule name, ``rule``:
    :func:`halting_from_form`'s (its parameters already leave out the tokenizer's EOS and padding); ``cache``:
    ``CACHE_NONE``, ``prefix`` or ``dual``; ``parallel``: 0 (or empty) for off, else the commit threshold."""
    # Prophet runs with its defaults, and its to_dict() also names its cutoffs, which its parameters do not take.
    method = {HALT_NONE: "full", HALT_PROPHET: "prophet"}.get(halting)
    named = {"method": method, "params": {}} if method else halting_spec(rule)
    try:
        return DecodeSpec(gen_length=gen_length, steps=steps, block_length=block_length,
                          cache=None if cache == CACHE_NONE else cache,
                          parallel_threshold=None if parallel in (None, 0) else parallel,
                          **named)
    except ValueError as e:
        raise _error(str(e)) from e


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


def trace_plot(trace: list, full_trace: Optional[list], thresholds: Optional[list], title: str):
    """A matplotlib figure of the halting statistic against the threshold at every forward pass.

    ``trace`` is the decoded run's ``TraceStep`` list, ``full_trace`` the full-steps run's (None when the decoded
    run is the full-steps run), ``thresholds`` the rule's threshold at each step (None without a rule).
    """
    from matplotlib.figure import Figure

    def finite(steps):  # a pass with nothing left masked has an infinite statistic: nothing to draw
        return [t for t in steps if math.isfinite(t.margin)]

    fig = Figure(figsize=(6.4, 3.4), dpi=100)
    ax = fig.subplots()
    if full_trace is not None:
        ax.plot([t.step + 1 for t in finite(full_trace)], [t.margin for t in finite(full_trace)], color="0.6",
                marker=".", label="mean margin, full steps")
    label = "mean margin" if thresholds is None else "halting statistic"
    ax.plot([t.step + 1 for t in finite(trace)], [t.margin for t in finite(trace)], color="tab:blue", marker="o",
            label=label)
    if thresholds is not None:
        ax.plot(range(1, len(thresholds) + 1), thresholds, color="tab:red", linestyle="--", label="threshold")
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


def run_text(models: Models, prompt, gen_length, steps, block_length, halting, kind, high, low, k, stat,
             cache=CACHE_NONE, parallel=0.0):
    """Decode ``prompt`` under the halting rule, KV cache and parallel commits (:func:`spec_from_form`), streaming
    each forward pass; then plain full steps (no rule, no cache, no parallel commits) to compare, unless that is
    what was decoded.

    Yields ``(answer, summary markdown, span highlights, trace figure, trace table, details dict)``; updates
    while decoding carry only the status and the span (the answer is empty, the rest None).
    """
    from ...dllm.charlm.tokenizer import decode_answer, encode_prompts
    from ...dllm.generate import generate

    if not isinstance(prompt, str) or not prompt.strip():
        raise _error("the prompt is empty: type one, or pick a task to get an example")
    gen_length = _as_int("generation length", gen_length, 1)
    steps = _as_int("steps", steps, 1, MAX_TEXT_STEPS)
    block_length = _as_int("block length", block_length, 1)
    model, tok = models.text()
    rule = halting_from_form(halting, kind, high, low, k, stat, tok)
    spec = spec_from_form(gen_length, steps, block_length, halting, rule, cache, parallel)
    # Made afresh, not spec.replace(...): a Prophet spec's normalised parameters do not pass its own check again.
    baseline = DecodeSpec(gen_length=gen_length, steps=steps, block_length=block_length)

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

    def decode(run_spec: DecodeSpec):
        def run(events, cancelled):
            tap = Tap(model, prompt_length, [tok.mask_token_id] * gen_length, events, cancelled)
            start = time.perf_counter()
            out = generate(tap, ids, attention_mask=attn, mask_id=tok.mask_token_id, return_trace=True,
                           **run_spec.loop_kwargs())
            return Decoded(out, time.perf_counter() - start)

        return run

    name = "; ".join([describe_halting(rule)] + ([f"cache {spec.cache}"] if spec.cache else [])
                     + ([f"parallel >= {spec.parallel_threshold:g}"] if spec.parallel_threshold else []))
    shown: list = [None]  # the span on the page, so the next update can mark what is new

    # While decoding, the previous request's results are cleared: only the status and the span show.
    def live(passes, span):
        value, shown[0] = _highlighted(tok, span, shown[0]), span
        return "", f"Decoding with {name}: forward pass {passes} (at most {steps}).", value, None, None, None

    def comparing(passes, span):
        # Drawn like the halted run's updates, so both timed decodes share the page's overhead alike.
        value, shown[0] = _highlighted(tok, span, shown[0]), span
        status = (f"Done in {int(decoded.out.nfe[0])} forward passes. Decoding with full steps to compare: "
                  f"pass {passes} of {steps}.")
        return "", status, value, None, None, None

    try:
        decoded = yield from relay(decode_streaming(decode(spec)), live)
        compared = spec != baseline
        full = (yield from relay(decode_streaming(decode(baseline)), comparing)) if compared else decoded
    except ValueError as e:  # the loop's checks: a block-causal model's blocks, dual cache on it, ...
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
    valid, full_valid = scored(task, prompt, answer, full_answer)
    details = {
        "task": task, "prompt_length": prompt_length, "gen_length": gen_length, "steps": steps,
        "block_length": block_length, "halting": describe_halting(rule), "decoding": name, "cache": spec.cache,
        "parallel_threshold": spec.parallel_threshold, "decode": spec.to_dict(), "compared": compared,
        "answer": answer, "nfe": nfe, "halt_step": halt_step,
        "full_steps_answer": full_answer, "full_steps_nfe": full_nfe, "speedup_nfe": full_nfe / nfe,
        "seconds": decoded.seconds, "seconds_full_steps": full.seconds,
        "speedup_wall": full.seconds / decoded.seconds, "valid": valid, "full_steps_valid": full_valid,
    }
    yield (answer, _text_summary(details), _highlighted(tok, out.generated[0].tolist(), filled=filled),
           trace_plot(trace, full.out.trace[0] if compared else None,
                      None if rule is None else rule.threshold_per_step(steps),
                      f"{name}: {nfe} of {full_nfe} forward passes"),
           _trace_rows(tok, trace), details)


def scored(task: Optional[str], prompt: str, *answers: str) -> tuple:
    """Whether the task's scorer accepts each answer; Nones for a free prompt (no task) or a prompt with a task's
    tag that is not well formed (nothing to score against)."""
    from ...dllm.charlm.tasks import score

    if task is not None:
        try:
            return tuple(score(task, prompt, a) for a in answers)
        except ValueError:
            pass
    return (None,) * len(answers)


def verdict(valid: Optional[bool]) -> str:
    """How a summary qualifies an answer: nothing for a free prompt, else whether the task's scorer accepts it."""
    return "" if valid is None else (" (a right answer)" if valid else " (not a right answer)")


def _text_summary(d: dict) -> str:
    head = f"Answer `{d['answer']}`{verdict(d['valid'])}."
    if not d["compared"]:
        return f"{head} **NFE {d['nfe']}**: full steps, no halting rule ({d['seconds']:.2f} s)."
    halted = "" if d["halting"] == "full steps" else \
        f"; {'halted at pass ' + str(d['halt_step'] + 1) if d['halt_step'] >= 0 else 'never halted'}"
    same = ("the same answer" if d["answer"] == d["full_steps_answer"]
            else f"`{d['full_steps_answer']}`{verdict(d['full_steps_valid'])}")
    return (
        f"{head} **NFE {d['nfe']}** against {d['full_steps_nfe']} for full steps: **{d['speedup_nfe']:.2f}x fewer "
        f"forward passes**, {d['speedup_wall']:.2f}x wall-clock ({d['seconds']:.2f} s against "
        f"{d['seconds_full_steps']:.2f} s), decoding with {d['decoding']}{halted}. Full steps give {same}."
    )
