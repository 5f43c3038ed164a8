"""Streaming a text decode to the page: the decode runs in a worker thread, and every forward pass reports the span it
is about to read (:class:`Tap`, for the LLaDA-style loop) or the draft it just made (:class:`DraftTap`, a streamer for
DiffusionGemma's ``generate``), so the page can show decoding as it happens."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generator

if TYPE_CHECKING:
    import torch

STREAM_INTERVAL = 0.2  # seconds between streamed updates: smooth to the eye, and each update costs gradio work


@dataclass
class Decoded:
    """One timed decode of one prompt: ``out`` is what the decoding call returned (``generate``'s output)."""

    out: object
    seconds: float


class _Cancelled(Exception):
    """The request went away; the decode stops at its next forward pass."""


class Tap:
    """The model as ``generate`` sees it: every forward pass first reports the span as it stands.

    A cached pass (``cache="prefix"`` / ``"dual"``) reads only a window of the sequence, starting at its first
    ``position_ids``; the window is written over the span as last reported, since tokens outside it did not change.

    Args:
        model: the text model (``model(input_ids, attention_mask=..., ...)`` -> ``.logits``).
        prompt_length: where the span starts in the sequence.
        span: the span's token ids before the first pass (every position masked), ``list[int]``.
        events: gets the span ``list[int]`` at every forward pass (batch of one).
        cancelled: set when nobody is listening any more; the next forward raises ``_Cancelled``.
    """

    def __init__(self, model, prompt_length: int, span: list[int], events: queue.Queue, cancelled: threading.Event):
        # ``forward`` is what the caches inspect for the model's cache keyword; calls come through ``__call__``.
        self.model, self.config, self.forward = model, model.config, model.forward
        self.prompt_length, self.span, self.events, self.cancelled = prompt_length, list(span), events, cancelled

    def __call__(self, input_ids, **kwargs):
        if self.cancelled.is_set():
            raise _Cancelled
        positions = kwargs.get("position_ids")
        start = 0 if positions is None else int(positions[0, 0])
        for i, token in enumerate(input_ids[0].tolist(), start - self.prompt_length):
            if 0 <= i < len(self.span):
                self.span[i] = token
        self.events.put(list(self.span))
        return self.model(input_ids, **kwargs)


class DraftTap:
    """A transformers streamer for ``DiffusionGemmaForBlockDiffusion.generate`` (batch of one): every denoising step
    reports the text so far (the canvases already decoded, then the current step's argmax canvas) and keeps the
    step's temperature-scaled logits for the trace.

    Args:
        events: gets the generated token ids ``list[int]`` after every denoising step.
        cancelled: set when nobody is listening any more; the next step raises ``_Cancelled``.

    After ``generate``, ``drafts`` holds ``(canvas index, step index in that canvas, logits [canvas, V])`` per step.
    """

    _takes_logits = True  # generate then passes put_draft the step's logits instead of its argmax

    def __init__(self, events: queue.Queue, cancelled: threading.Event):
        self.events, self.cancelled = events, cancelled
        self.drafts: list[tuple[int, int, "torch.Tensor"]] = []
        self._decoded: list[int] = []
        self._puts = 0

    def put(self, value) -> None:
        # The first put is the prompt; each later one is a finished canvas.
        if self._puts:
            self._decoded += value[0].tolist()
        self._puts += 1

    def put_draft(self, logits) -> None:
        if self.cancelled.is_set():
            raise _Cancelled
        canvas = self._puts - 1
        step = sum(1 for c, _, _ in self.drafts if c == canvas)
        logits = logits[0].float().clone()
        self.drafts.append((canvas, step, logits))
        self.events.put(self._decoded + logits.argmax(-1).tolist())

    def end(self) -> None:
        """Nothing to flush: every step was reported as it came."""


_DONE = object()


def decode_streaming(run) -> Generator[tuple[int, list[int]], None, Decoded]:
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
            # The first pass shows at once; later ones are coalesced into the latest.
            while passes:
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


def relay(updates, render):
    """Yield ``render(*update)`` for every update of the generator ``updates``; return what it returns."""
    with contextlib.closing(updates):
        while True:
            try:
                update = next(updates)
            except StopIteration as stop:
                return stop.value
            yield render(*update)
