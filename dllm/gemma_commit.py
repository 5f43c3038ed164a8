"""The learned commit rule as a DiffusionGemma stopping criterion: stop a canvas once every token's argmax is final.

DiffusionGemma denoises a canvas of uniformly corrupted tokens: no position is masked, every one is redrawn at every
step, and the canvas a stopped sample keeps is the step's argmax. So there is nothing to commit token by token (the
learned rule's ``commit`` mode of the masked loops has no counterpart here); the rule only halts. After every step
:class:`LearnedStopping` computes, per canvas token, :data:`GEMMA_FEATURES` from what the step gives (the
temperature-scaled logits and their argmax), and the learned :class:`~diffexit.dllm.commit_rule.CommitNet` maps them
to the probability that the token's argmax is the one the canvas ends with after every step. A sample stops when every
token of its canvas clears the threshold::

    from diffexit.dllm.gemma_commit import LearnedStopping
    from diffexit.dllm.gemma_loop import decode
    out = decode(model, ids, stopping=LearnedStopping(), max_new_tokens=64, max_denoising_steps=16)

``LearnedStopping()`` takes the ``commit_rule.safetensors`` shipped beside the model's weights and its calibrated
threshold (``diffexit train commit --model gemma`` writes both). :func:`record` and :func:`halted` are the
trainer's: one all-steps decode with every step's features kept, and what halting at a threshold would have given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaAdaptiveStopping

from .commit_rule import HELD_CAP, MARGIN_CAP, CommitModel, check_mode_threshold, resolve, weights_digest

# Per token, then four of its canvas (the same for every token of it): the share of tokens whose argmax changed at
# this step, the least held count, the least margin and the mean top-1 probability. A canvas stops only when all
# its tokens clear, so what the rest of the canvas does tells a token's classifier how settled the canvas is
# (on the embedded model's held-out draw 1 they took chain from 74.7 to 73.1 passes and pick from 4.9 to 4.2 at the
# calibrated 0.999, every answer kept).
GEMMA_FEATURES = ("margin", "entropy", "top1_prob", "held", "progress", "position", "is_eos", "canvas_changed",
                  "canvas_least_held", "canvas_least_margin", "canvas_top1_prob")
MODE = "halt"  # the only one: uniform diffusion has no masks to commit


def text_vocab(model) -> int:
    """The token vocabulary of a DiffusionGemma model (its text config's)."""
    return int(model.config.get_text_config().vocab_size)


def check_gemma(commit_model: CommitModel, model, where: str) -> None:
    """``ValueError`` naming the fix unless ``commit_model`` is a DiffusionGemma rule trained for ``model``: its
    features, vocabulary, canvas length and weights digest."""
    fix = f"train one for it with `diffexit train commit --model FOLDER` and pass that file (this one: {where})"
    if commit_model.features != GEMMA_FEATURES:
        raise ValueError(f"the commit model reads features {list(commit_model.features)}, a DiffusionGemma rule "
                         f"reads {list(GEMMA_FEATURES)} (it is a rule for the masked loops: pass it to "
                         f"diffexit.dllm.generate as halting=CommitRule(...)); {fix}")
    vocab = text_vocab(model)
    if vocab != commit_model.vocab_size:
        raise ValueError(f"the commit model was trained for a vocabulary of {commit_model.vocab_size}, the model has "
                         f"{vocab}; {fix}")
    length = int(model.config.canvas_length)
    if (length,) != tuple(commit_model.block_lengths):
        raise ValueError(f"the commit model was trained on canvases of {list(commit_model.block_lengths)} tokens, the "
                         f"model's are {length}; {fix}")
    digest = weights_digest(model)
    if digest != commit_model.lm_digest:
        raise ValueError(f"the commit model was trained for weights {commit_model.lm_digest}, the model's are "
                         f"{digest}; {fix}")


class CanvasFeatures(DiffusionGemmaAdaptiveStopping):
    """Per-sample state of the features (each token's argmax at the step before and how many steps it has held) and
    :meth:`features`; the base of :class:`LearnedStopping` and of :class:`Recorder`.

    The loops call ``begin(T)`` before a generation, ``reset()`` before each canvas, and ``select_rows(index)``
    when stopped samples leave the batch (``diffexit.dllm.gemma_loop``).
    """

    eos_token_ids: tuple[int, ...] = ()
    total_steps: Optional[int] = None

    def begin(self, total_steps: int) -> None:
        if total_steps <= 0:
            raise ValueError(f"the number of denoising steps must be positive, got {total_steps}")
        self.total_steps = total_steps
        self.reset()

    def reset(self) -> None:
        self._step, self._previous, self._held = 0, None, None

    def select_rows(self, index: torch.LongTensor) -> None:
        if self._previous is not None:
            self._previous, self._held = self._previous[index], self._held[index]

    def features(self, argmax_canvas: torch.LongTensor, logits: torch.Tensor) -> torch.Tensor:
        """``[b, L, F]`` float32 :data:`GEMMA_FEATURES` of every token of ``logits`` ``[b, L, V]`` (the step's
        temperature-scaled logits) and their argmax ``argmax_canvas`` ``[b, L]``; advances the step and held counts."""
        if self.total_steps is None:
            raise RuntimeError(f"{type(self).__name__}.begin(max_denoising_steps) must run before the first step "
                               f"(diffexit.dllm.gemma_loop.decode calls it)")
        if self._previous is None:
            self._held = torch.zeros_like(argmax_canvas)
        else:
            self._held = torch.where(argmax_canvas == self._previous, self._held + 1, 0)
        self._previous = argmax_canvas.clone()
        logp = logits.float().log_softmax(-1)
        top = logits.topk(2, dim=-1).values.float()
        b, length = argmax_canvas.shape
        progress = min(self._step, self.total_steps - 1) / max(self.total_steps - 1, 1)
        position = torch.arange(length, device=logits.device).float() / length
        eos = torch.isin(argmax_canvas, torch.as_tensor(self.eos_token_ids, dtype=torch.long,
                                                        device=argmax_canvas.device))
        self._step += 1
        margin = (top[..., 0] - top[..., 1]).clamp(0, MARGIN_CAP)
        held = self._held.clamp(max=HELD_CAP).float()
        top1 = logp.amax(-1).exp()

        def canvas(x):
            return x.expand(b, length)

        return torch.stack([
            margin, -(logp.exp() * logp).sum(-1), top1, held,
            torch.full((b, length), progress, device=logits.device), position[None].expand(b, length), eos.float(),
            canvas((held == 0).float().mean(-1, keepdim=True)), canvas(held.amin(-1, keepdim=True)),
            canvas(margin.amin(-1, keepdim=True)), canvas(top1.mean(-1, keepdim=True)),
        ], -1)


class LearnedStopping(CanvasFeatures):
    """Stop a sample once every token of its canvas clears: the predicted probability that its argmax is final
    exceeds ``threshold``.

    Args:
        source: a commit model file, ``learned`` (the one shipped beside the model's weights) or a loaded
            :class:`~diffexit.dllm.commit_rule.CommitModel`.
        threshold: in ``(0, 1]``; 1 never stops (every step). None: the model's calibrated halting threshold,
            which holds at the number of denoising steps it was calibrated at only.

    ``least`` ``[b]`` is, after each call, each sample's least token probability (the statistic the threshold is
    compared with).
    """

    def __init__(self, source="learned", threshold: Optional[float] = None):
        check_mode_threshold(MODE, threshold)
        self.source, self.threshold = source, threshold
        self.model: Optional[CommitModel] = source if isinstance(source, CommitModel) else None
        self._bound_to = None
        self.least: Optional[torch.Tensor] = None
        self.reset()

    def __repr__(self):
        return (f"LearnedStopping(source={self.source if isinstance(self.source, str) else 'CommitModel'!r}, "
                f"threshold={self.threshold})")

    def bind(self, model) -> "LearnedStopping":
        """Load the commit model (if named by path), refuse one made for another model, and take its calibrated
        threshold where none was given; :func:`diffexit.dllm.gemma_loop.decode` calls it (once per model)."""
        if self._bound_to is model:
            return self
        where = "given in memory"
        if self.model is None:
            path = resolve(str(self.source), model)
            self.model, where = CommitModel.load(path), str(path)
        check_gemma(self.model, model, where)
        self.calibrated = self.threshold is None
        if self.calibrated:
            known = self.model.thresholds.get(MODE, {})
            key = str(model.config.canvas_length)
            if key not in known:
                raise ValueError(f"the commit model ({where}) has no calibrated halting threshold; pass threshold=, "
                                 f"or calibrate one with `diffexit train commit --model FOLDER`")
            self.threshold = float(known[key])
        self.eos_token_ids = self.model.eos_token_ids
        self._bound_to = model
        return self

    def begin(self, total_steps: int) -> None:
        if self._bound_to is None:
            raise RuntimeError("LearnedStopping.bind(model) must run before begin (diffexit.dllm.gemma_loop.decode "
                               "calls both)")
        steps = self.model.record.get("denoising_steps")
        if self.calibrated and steps is not None and total_steps != steps:
            raise ValueError(f"the calibrated threshold {self.threshold} holds at {steps} denoising steps, and the "
                             f"decode runs {total_steps}: decode with max_denoising_steps={steps}, pass threshold=, "
                             f"or calibrate at {total_steps} with `diffexit train commit --steps {total_steps}`")
        super().begin(total_steps)

    def __call__(self, argmax_canvas: torch.LongTensor, logits: torch.Tensor, **kwargs) -> torch.BoolTensor:
        feats = self.features(argmax_canvas, logits)
        with torch.no_grad():
            p = torch.sigmoid(self.model.net(feats))
        self.least = p.amin(-1)
        return self.least > self.threshold


class Recorder(CanvasFeatures):
    """Never stops; ``canvases[k]`` is the list of canvas ``k``'s steps, each ``(features [b, L, F], argmax [b,
    L])`` on the CPU, ``b`` the samples that decode canvas ``k``."""

    def __init__(self, eos_token_ids: Sequence[int]):
        self.eos_token_ids = tuple(eos_token_ids)
        self.canvases: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        self.reset()

    def reset(self) -> None:
        super().reset()
        self._new_canvas = True

    def __call__(self, argmax_canvas: torch.LongTensor, logits: torch.Tensor, **kwargs) -> torch.BoolTensor:
        if self._new_canvas:
            self.canvases.append([])
            self._new_canvas = False
        self.canvases[-1].append((self.features(argmax_canvas, logits).cpu(), argmax_canvas.cpu()))
        return torch.zeros(argmax_canvas.shape[0], dtype=torch.bool, device=argmax_canvas.device)


@dataclass
class Recording:
    """One all-steps decode of ``B`` samples, every step's features kept.

    Attributes:
        canvases: per canvas, ``(rows [b], features [T, b, L, F], argmax [T, b, L])``: the samples (indices into the
            batch) that decoded it, and each step's features and argmax; the canvas ends as ``argmax[-1]``.
        generated: ``[B, canvases * L]`` the decoded tokens after the prompt (pad after a sample's first EOS).
        eos_token_id: the id that ends a sample (its canvas is its last).
    """

    canvases: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    generated: torch.Tensor
    eos_token_id: int

    @property
    def batch(self) -> int:
        return len(self.generated)

    def examples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features [N, F], labels [N])`` over every token of every step; label 1 where the argmax is the one the
        canvas ends with."""
        feats, labels = [], []
        for _, f, argmax in self.canvases:
            feats.append(f.reshape(-1, f.shape[-1]))
            labels.append((argmax == argmax[-1]).reshape(-1).float())
        return torch.cat(feats), torch.cat(labels)


def record(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, seeds: Sequence[int],
           max_new_tokens: int, steps: int, eos_token_ids: Sequence[int]) -> Recording:
    """A decode of ``input_ids`` ``[B, P]`` at every step (``diffexit.dllm.gemma_loop.decode``, per-sample noise
    ``seeds``) with every step's features kept; ``eos_token_ids`` feed the ``is_eos`` feature."""
    from .gemma_loop import decode

    rec = Recorder(eos_token_ids)
    out = decode(model, input_ids, attention_mask=attention_mask, stopping=rec, seeds=list(seeds),
                 max_new_tokens=max_new_tokens, max_denoising_steps=steps)
    eos = int(model.config.get_text_config().eos_token_id)
    length = model.config.canvas_length
    generated = out.sequences[:, input_ids.shape[1]:].cpu()
    live = torch.arange(len(input_ids))
    canvases = []
    for k, steps_k in enumerate(rec.canvases):
        f = torch.stack([s[0] for s in steps_k])
        a = torch.stack([s[1] for s in steps_k])
        if a.shape[1] != len(live):
            raise RuntimeError(f"canvas {k}: the recorder saw {a.shape[1]} samples, the sequences say {len(live)}")
        canvases.append((live, f, a))
        # A sample whose canvas holds EOS has ended; the loop drops it from the next canvas.
        live = live[~(generated[live, k * length:(k + 1) * length] == eos).any(-1)]
    return Recording(canvases, generated, eos)


def halted(recording: Recording, net, thresholds: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """What :class:`LearnedStopping` at each threshold would have given, from one all-steps recording:
    ``(changed [T, B] bool, passes [T, B] float)``.

    A stopped canvas is its argmax at the stop step; the seeded noise of every canvas is the same whatever stopped
    before (``diffexit.dllm.gemma_loop``'s per-sample noise), so while a stopped canvas equals the recorded one up to
    its first EOS the decode goes on as recorded (the tokens after the EOS are padded away, and the sample ends
    there either way). A sample's answer changes exactly when one of its canvases differs from the recorded one at
    or before that canvas's first EOS (anywhere, if it has none). The passes after such a canvas are the recorded
    canvases' (an estimate: the decode would have followed another trajectory).
    """
    t = torch.as_tensor(list(thresholds), dtype=torch.float32)
    changed = torch.zeros(len(t), recording.batch, dtype=torch.bool)
    passes = torch.zeros(len(t), recording.batch)
    with torch.no_grad():
        for rows, f, argmax in recording.canvases:
            steps = argmax.shape[0]
            least = torch.sigmoid(net(f)).amin(-1)  # [S, b]
            clear = least[None] > t[:, None, None]  # [T, S, b]
            clear[:, -1] = True  # a canvas that never clears runs every step and ends as the recording
            first = clear.float().argmax(1)  # [T, b]: the first step that clears
            passes[:, rows] += first.float() + 1
            final = argmax[-1]  # [b, L]
            is_eos = final == recording.eos_token_id
            # Positions up to and including the first EOS: what the answer reads.
            counted = (is_eos.long().cumsum(-1) - is_eos.long()) == 0
            stopped = argmax[first, torch.arange(len(rows))[None]]  # [T, b, L]
            differs = ((stopped != final[None]) & counted[None]).any(-1)
            changed[:, rows] |= differs
    return changed, passes
