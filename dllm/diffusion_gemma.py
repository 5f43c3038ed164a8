"""SchED for DiffusionGemma: a progress-aware stopping rule for ``DiffusionGemmaForBlockDiffusion.generate``.

transformers' DiffusionGemma denoises each canvas for up to ``max_denoising_steps`` steps and asks an adaptive
stopping rule (``DiffusionGemmaAdaptiveStopping``: ``rule(argmax_canvas, logits) -> BoolTensor``) after every step
which samples are done; a done sample's canvas is frozen at its argmax. The stock rule,
``StableAndConfidentStoppingCriteria``, stops a sample once its argmax has been stable for ``stability_threshold``
steps and the mean token entropy of the (temperature-scaled) logits is below ``confidence_threshold``.
:class:`SchEDStopping` compares a canvas statistic with a :class:`~diffexit.common.schedules.ThresholdSchedule` of
the step's progress instead::

    from diffexit.dllm.diffusion_gemma import SchEDStopping, enable_sched
    enable_sched(model, SchEDStopping(ThresholdSchedule("cosine", 7.5, 2.5), stat="mean"))
    out = model.generate(input_ids, max_new_tokens=64)       # as before; disable_sched(model) undoes it

In diffusers, ``diffexit.samplers.diffusion_gemma_pipeline.SchEDDiffusionGemmaPipeline`` takes the same rule as
``stopping=``. ``generate`` keeps a stopped sample in its batch until every sample has stopped;
``diffexit.dllm.gemma_loop.decode(model, ids, stopping=rule, ...)`` runs the same decode with stopped samples out of
the batch (the rule's ``select_rows`` keeps its state in step).

Statistics (the ``canvas`` surface of :data:`diffexit.dllm.statistics.STATISTICS`: the whole canvas, since no
position of it is "masked" in uniform-corruption diffusion): ``mean``, ``median``, ``quantile`` and ``min`` of the
top-1 minus top-2 logit margin, and ``mean_entropy``, minus the mean token entropy in nats: the stock rule's own
statistic, so that ``SchEDStopping(ThresholdSchedule("constant", -0.005, -0.005), stat="mean_entropy", patience=1)``
stops where the stock rule does. ``patience`` is the stock rule's stability gate (the argmax unchanged for that many
steps).

The hook: ``enable_sched`` sets two attributes on the model instance, ``generate`` (a wrapper that refuses the stock
``stability_threshold`` / ``confidence_threshold`` beside a rule of ours) and ``_prepare_diffusion_stopping_criteria``
(the method ``generate`` builds its stopping rule with); transformers offers no public argument for a custom
diffusion stopping rule. The compile path (a static cache) compiles the stock rule's ``__call__`` by assigning it
on the instance, which the call ``rule(...)`` never reads, so this rule always runs eagerly, compiled or not.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional

import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaAdaptiveStopping

from ..common.schedules import ThresholdSchedule, progress
from ..kernels import token_stats
from .halting import aggregate_margin
from .statistics import CANVAS, check_stat, names

STATS = names(CANVAS)
STOCK = ("stability_threshold", "confidence_threshold")


class SchEDStopping(DiffusionGemmaAdaptiveStopping):
    """Stop a sample once its canvas statistic reaches ``schedule(step / (T - 1))``, per sample.

    Args:
        schedule: the threshold over the progress of the canvas's denoising (``T`` = ``max_denoising_steps``).
        stat: see the module docstring.
        q: the quantile for ``stat="quantile"``.
        patience: also require the argmax canvas to have been unchanged for this many steps (0: no gate).

    ``stop_steps`` ``[B]`` holds each sample's 0-based stop step in the latest canvas (-1: it ran every step) and
    ``canvas_stops`` those of every canvas so far in the call (a list of ``[B]`` tensors); ``B`` is the batch of
    the canvas's first call. The decoder passes a sample took are what the model counts
    (``decoder_forward_passes``).
    """

    def __init__(self, schedule: ThresholdSchedule, stat: str = "mean", q: float = 0.1, patience: int = 0):
        if not isinstance(schedule, ThresholdSchedule):
            raise ValueError(f"schedule must be a ThresholdSchedule (e.g. ThresholdSchedule('cosine', 7.5, 2.5)), "
                             f"got {type(schedule).__name__}")
        check_stat(stat, CANVAS)
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be an int >= 0, got {patience!r}")
        self.schedule, self.stat, self.q, self.patience = schedule, stat, q, patience
        self.total_steps: Optional[int] = None
        self.stop_steps: Optional[torch.Tensor] = None
        self.canvas_stops: list[torch.Tensor] = []
        self.reset()

    def __repr__(self):
        return f"SchEDStopping({self.schedule.describe()}, stat={self.stat!r}, patience={self.patience})"

    def to_dict(self) -> dict:
        """The parameters, JSON-ready: ``SchEDStopping(**params)`` with the schedule as a ``ThresholdSchedule``
        dict (``diffexit.dllm.rule_spec.gemma_stopping`` builds one from this)."""
        return {"schedule": self.schedule.to_dict(), "stat": self.stat, "q": self.q, "patience": self.patience}

    def begin(self, total_steps: int) -> None:
        """A new generation of ``total_steps`` denoising steps per canvas (the loops call this)."""
        if total_steps <= 0:
            raise ValueError(f"the number of denoising steps must be positive, got {total_steps}")
        self.total_steps = total_steps
        self.canvas_stops = []
        self.reset()

    def reset(self):
        """A new canvas: the step count and the stability history start again."""
        self._step = 0
        self._previous = None
        self._stable = None
        self._stopped = None
        self._rows = None

    def select_rows(self, index: torch.LongTensor) -> None:
        """Keep the state of the batch rows ``index`` only, in that order: the next call gets those samples only
        (``diffexit.dllm.gemma_loop`` drops stopped samples from the batch). ``stop_steps`` keeps every row."""
        if self._stopped is None:
            return
        self._previous = None if self._previous is None else self._previous[index]
        self._stable, self._stopped, self._rows = self._stable[index], self._stopped[index], self._rows[index]

    def statistic(self, logits: torch.Tensor) -> torch.Tensor:
        """The canvas statistic of ``logits`` ``[B, canvas, V]``: ``[B]`` float32, larger means more sure."""
        if self.stat == "mean_entropy":
            return -token_stats(logits).entropy.float().mean(-1)
        # The margins alone: the two largest logits (exact in their dtype, subtracted in float32 as token_stats
        # does) cost a fraction of token_stats' every statistic, which the loop pays at every step.
        top = logits.topk(2, dim=-1).values.float()
        margin = top[..., 0] - top[..., 1]
        everywhere = torch.ones(margin.shape, dtype=torch.bool, device=logits.device)
        return aggregate_margin(margin, everywhere, self.stat, self.q)

    def __call__(self, argmax_canvas: torch.LongTensor, logits: torch.Tensor, **kwargs) -> torch.BoolTensor:
        if self.total_steps is None:
            raise RuntimeError("SchEDStopping needs the number of denoising steps: enable it with "
                               "enable_sched(model, rule), or pass it to SchEDDiffusionGemmaPipeline as stopping=")
        batch, device = argmax_canvas.shape[0], argmax_canvas.device
        if self._stopped is None:
            self._stopped = torch.zeros(batch, dtype=torch.bool, device=device)
            self._stable = torch.zeros(batch, dtype=torch.long, device=device)
            self.stop_steps = torch.full((batch,), -1, dtype=torch.long, device=device)
            self.canvas_stops.append(self.stop_steps)
            self._rows = torch.arange(batch, device=device)  # each current row's index in stop_steps
        threshold = self.schedule(progress(min(self._step, self.total_steps - 1), self.total_steps))
        stop = self.statistic(logits) >= threshold
        if self.patience:
            same = (argmax_canvas == self._previous).all(-1) if self._previous is not None else torch.zeros_like(stop)
            self._stable = torch.where(same, self._stable + 1, 0)
            stop &= self._stable >= self.patience
        self._previous = argmax_canvas.clone()
        newly = stop & ~self._stopped
        self.stop_steps[self._rows[newly]] = self._step
        self._stopped |= stop
        self._step += 1
        return stop


def canvas_seed(seed: int, canvas: int) -> int:
    """The seed of canvas ``canvas`` (0-based) of a decode seeded ``seed``: ``CanvasSeeds`` reseeds torch's global
    generator with it, ``diffexit.dllm.gemma_loop`` each sample's own generator."""
    return seed * 1_000_003 + canvas


class CanvasSeeds:
    """A streamer for ``DiffusionGemmaForBlockDiffusion.generate`` that reseeds torch's global generator before every
    canvas with ``(seed, canvas index)``.

    The sampler draws its noise from that generator, and a canvas whose samples all stopped early skips the draws of
    the steps it did not run, so without this every later canvas of the batch would see other noise than a decode
    that ran every step. With it, a decode under a stopping rule and one that runs every step draw the same noise in
    every canvas, and differ only where the rule changed a canvas. ``generate`` calls ``put`` with the prompt before
    the first canvas and with each finished canvas; everything is passed on to ``inner`` (another streamer) if given.
    """

    def __init__(self, seed: int, inner=None):
        self.seed, self.inner, self.canvas = seed, inner, 0
        self._takes_logits = getattr(inner, "_takes_logits", False)

    def put(self, value) -> None:
        torch.manual_seed(canvas_seed(self.seed, self.canvas))
        self.canvas += 1
        if self.inner is not None:
            self.inner.put(value)

    def put_draft(self, **kwargs) -> None:
        if self.inner is not None and hasattr(self.inner, "put_draft"):
            self.inner.put_draft(**kwargs)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


def _prepare(rule: DiffusionGemmaAdaptiveStopping, generation_config) -> DiffusionGemmaAdaptiveStopping:
    rule.begin(generation_config.max_denoising_steps)
    return rule


def decoder_forward_passes(output, prompt_length: int, pad_token_id) -> torch.Tensor:
    """The decoder passes each sample took in a ``generate(..., return_dict_in_generate=True)`` call, ``[B]`` int64.

    The model reports ``tokens_per_forward`` = generated non-pad tokens / passes (a pass counts for a sample until
    it stops or its sequence ends); this inverts it.
    """
    new = output.sequences[:, prompt_length:]
    valid = (new != pad_token_id).sum(-1) if pad_token_id is not None else torch.full_like(new[:, 0], new.shape[1])
    if (valid == 0).any():
        raise ValueError("a sample generated padding only, so its decoder passes cannot be read from "
                         "tokens_per_forward (generated non-pad tokens / passes)")
    return (valid.double() / output.tokens_per_forward.double()).round().long()


def enable_sched(model, rule: DiffusionGemmaAdaptiveStopping) -> None:
    """Make ``model.generate`` stop each canvas's denoising with ``rule`` instead of the stock rule: a
    :class:`SchEDStopping`, or the learned rule (``diffexit.dllm.gemma_commit.LearnedStopping``), which loads and
    checks its commit model against ``model`` here."""
    from transformers import DiffusionGemmaForBlockDiffusion

    if not isinstance(model, DiffusionGemmaForBlockDiffusion):
        raise ValueError(f"enable_sched takes a DiffusionGemmaForBlockDiffusion, got {type(model).__name__}; for "
                         f"LLaDA-style models use diffexit.dllm.generate(..., halting=SchED(...))")
    if not isinstance(rule, DiffusionGemmaAdaptiveStopping) or not callable(getattr(rule, "begin", None)):
        raise ValueError(f"rule must be a SchEDStopping or a LearnedStopping (diffexit.dllm.gemma_commit), got "
                         f"{type(rule).__name__}; for the stock rule call generate without enable_sched")
    if callable(getattr(rule, "bind", None)):
        rule.bind(model)  # a commit model made for other weights is refused before any decode
    original = type(model).generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        given = [k for k in STOCK if k in kwargs]
        if given:
            raise ValueError(f"{', '.join(given)} set the stock stopping rule, which enable_sched replaced with "
                             f"{rule!r}; drop them, or call disable_sched(model) to use the stock rule")
        return original(model, *args, **kwargs)

    model.generate = generate
    model._prepare_diffusion_stopping_criteria = functools.partial(_prepare, rule)
    model._diffexit_stopping = rule


def disable_sched(model) -> None:
    """Undo :func:`enable_sched`: the stock rule again."""
    if getattr(model, "_diffexit_stopping", None) is None:
        raise ValueError("SchED is not enabled on this model")
    for name in ("generate", "_prepare_diffusion_stopping_criteria", "_diffexit_stopping"):
        vars(model).pop(name, None)


@contextlib.contextmanager
def sched_enabled(model, rule: Optional[DiffusionGemmaAdaptiveStopping]) -> Iterator[None]:
    """:func:`enable_sched` for the ``with`` block only; ``rule=None`` leaves the model as it is."""
    if rule is None:
        yield
        return
    enable_sched(model, rule)
    try:
        yield
    finally:
        disable_sched(model)
