"""Training data and fitting for the learned commit rule (:mod:`diffexit.dllm.commit_rule`).

The data are the language model's own full-step trajectories: :func:`record` decodes prompts at full steps with a
:class:`Recorder` that never halts and keeps, at every step, the features of every masked position and whether its
current argmax is the token the decode ends with there (the label). A rule trained on them is exact where the
decode stays on the full-step trajectory; commits move it off, which calibration (:mod:`diffexit.dllm.calibrate`,
on decodes that do commit) accounts for. :func:`fit` trains a :class:`~diffexit.dllm.commit_rule.CommitNet` on the
data, seeded. :func:`halted_spans` gives, from a recorded run, what whole-span (or per-block) halting at a
threshold would have produced, so the halting threshold calibrates from one full-step run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..common.results import atomic_write_bytes
from .calibrate import wilson
from .commit_rule import CommitFeatures, CommitNet
from .generate import generate
from .halting import HaltDecision


# Halting thresholds, conservative to aggressive; a conformal scan stops at the first one over the bound.
HALT_SCAN = (0.9999, 0.9995, 0.999, 0.998, 0.995, 0.99, 0.98, 0.97, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)


def cached(path: Path, make):
    """``torch.load(path)`` if it exists, else ``make()`` saved there atomically: the trainers' resume."""
    if path.is_file():
        return torch.load(path, weights_only=False)
    value = make()
    tmp = path.with_name(path.name + ".tmp")
    torch.save(value, tmp)
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink()
    return value


def summary(changed: list[int], nfe: list[float], full_nfe: list[float]) -> dict:
    """Validation figures: ``changed`` (0/1 per prompt), its rate and Wilson 95% interval, and the NFE speedup
    (summed full-step passes over summed passes)."""
    n, k = len(changed), sum(changed)
    return {"n": n, "changed": k, "rate": k / n, "rate_ci95": wilson(k, n), "speedup_nfe": sum(full_nfe) / sum(nfe)}


class Recorder(CommitFeatures):
    """A rule that never halts and keeps, per step, each row's features, masks and argmax.

    Args:
        block_length: the decode's block length.
        eos_token_ids: end-of-text ids, for the ``is_eos`` feature.
    """

    def __init__(self, block_length: int, eos_token_ids: Sequence[int]):
        self.block_length, self.eos_token_ids = block_length, tuple(eos_token_ids)

    def start(self, batch_size, span_length, device, total_steps):
        super().start(batch_size, span_length, device, total_steps)
        self.view = span_length
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def decide(self, stats, masked, step, rows):
        feats = self.features(stats, masked, step, rows)
        self.steps.append((rows.cpu(), feats.cpu(), masked.cpu(), stats.top1_id.cpu()))
        none = torch.zeros(len(rows), dtype=torch.bool, device=masked.device)
        value = torch.zeros(len(rows), device=masked.device)
        return HaltDecision(halt=none, value=value, threshold=value + 1)


@dataclass
class Recording:
    """One full-step decode of ``B`` prompts and what the recorder saw.

    Attributes:
        final: ``[B, L]`` the full-step spans.
        steps: per forward pass, ``(rows [A], features [A, W, F], masked [A, W], argmax [A, W])`` where a row is a
            sample (``W = L``) or, on a block-causal model, sample * blocks + block (``W`` = the block length).
    """

    final: torch.Tensor
    steps: list
    view: int

    def targets(self, rows: torch.Tensor) -> torch.Tensor:
        """``[A, W]`` the final tokens of each row's view."""
        blocks = self.final.shape[1] // self.view
        return self.final.reshape(-1, self.view)[rows] if blocks > 1 else self.final[rows]

    def examples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features [N, F], labels [N])`` float32 over every masked position of every step; label 1 where the
        argmax is the final token."""
        feats, labels = [], []
        for rows, f, masked, top1 in self.steps:
            feats.append(f[masked])
            labels.append((top1 == self.targets(rows))[masked].float())
        return torch.cat(feats), torch.cat(labels)


def record(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], *, gen_length: int, steps: int,
           block_length: int, mask_id: int, eos_token_ids: Sequence[int]) -> Recording:
    """A greedy full-step decode of ``input_ids`` ``[B, P]`` with the features recorded at every step."""
    rec = Recorder(block_length, eos_token_ids)
    out = generate(model, input_ids, attention_mask=attention_mask, gen_length=gen_length, steps=steps,
                   block_length=block_length, mask_id=mask_id, halting=rec)
    return Recording(out.generated.cpu(), rec.steps, rec.view)


def halted_spans(recording: Recording, net: CommitNet, thresholds: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """What halting when every masked position clears would give at each threshold, from one recorded run.

    Before it halts, a halting rule changes nothing, so a halt at step ``t`` gives the tokens committed by then plus
    that step's argmax at the masks: exact for whole-span halting. Per block (a block-causal model), the blocks
    after one that halts with other tokens than the recorded ones would follow another trajectory and are left as
    recorded; the answer (up to its first end-of-text) changes in that case whatever they hold, so whether the
    answer changed is still exact. Returns ``(spans [T, B, L], nfe [T, B])`` float NFE per sample.
    """
    final = recording.final
    batch, length = final.shape
    view = recording.view
    blocks = length // view
    rows_total = batch * blocks if blocks > 1 else batch
    t = torch.as_tensor(list(thresholds), dtype=torch.float32)
    out = final.reshape(rows_total, -1)[None].repeat(len(t), 1, 1)
    halted = torch.zeros(len(t), rows_total, dtype=torch.bool)
    passes = torch.zeros(len(t), rows_total)
    with torch.no_grad():
        for rows, f, masked, top1 in recording.steps:
            p = torch.sigmoid(net(f))
            least = torch.where(masked, p, torch.ones_like(p)).amin(-1)  # [A]
            go = ~halted[:, rows]  # [T, A]: rows still decoding at each threshold
            passes[:, rows] += go.float()
            now = go & (least[None, :] > t[:, None]) & masked.any(-1)[None, :]
            # The committed tokens at this step are the final ones wherever the row is not masked.
            filled = torch.where(masked, top1, recording.targets(rows))
            out[:, rows] = torch.where(now[..., None], filled[None], out[:, rows])
            halted[:, rows] |= now
    nfe = passes.view(len(t), batch, -1).sum(-1) if blocks > 1 else passes
    return out.view(len(t), batch, length), nfe


def fit(features: torch.Tensor, labels: torch.Tensor, *, seed: int, steps: int = 1500, batch: int = 4096,
        lr: float = 3e-3, progress=None) -> tuple[CommitNet, dict]:
    """Train a :class:`CommitNet` with binary cross-entropy on ``features`` ``[N, F]`` and ``labels`` ``[N]``.

    Deterministic for a seed (CPU). Returns the net (eval mode) and ``{"loss": final mean loss, "accuracy": at
    0.5, "positives": share of label 1, "examples": N}``.
    """
    if len(features) == 0:
        raise ValueError("no training examples: record at least one prompt")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = CommitNet(features=features.shape[1])
    net.mean.copy_(features.mean(0))
    net.std.copy_(features.std(0).clamp(min=1e-3))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    net.train()
    for _ in range(steps):
        idx = torch.randint(len(features), (min(batch, len(features)),), generator=g)
        loss = loss_fn(net(features[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress is not None:
            progress.update(1)
    net.eval()
    with torch.no_grad():
        logits = torch.cat([net(chunk) for chunk in features.split(65536)])
        figures = {"loss": float(loss_fn(logits, labels)), "accuracy": float(((logits > 0).float() == labels)
                                                                               .float().mean()),
                   "positives": float(labels.mean()), "examples": len(labels)}
    return net, figures
