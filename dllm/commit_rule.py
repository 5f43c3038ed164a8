"""A learned commit rule: a tiny per-token classifier that says when a masked token's current argmax is final.

At every step of a masked-diffusion decode the loop already has, per position, the top-1 minus top-2 logit margin,
the entropy, the argmax probability and the argmax itself. :class:`CommitRule` adds how many steps that argmax has
held, the progress through the block, the position in the block, how far ahead of the current block the position
is, whether the argmax is end-of-text, and the share of its block still masked (:data:`FEATURES`), and a small MLP
(:class:`CommitNet`, about 1.5k weights) maps them to the probability that the argmax is the token full-step
decoding would end with there. A masked position *clears* when that probability exceeds the threshold; a
threshold of 1 never clears.

The rule is a :class:`~diffexit.dllm.halting.HaltingRule`, so every loop can use it:

- ``mode="halt"`` (``learned-halt``): halt once every masked position clears (per block on a block-causal model).
- ``mode="commit"`` (``learned-commit``): also commit, at every step, each masked token of the current block that
  clears (besides the loop's usual scheduled ones), and fill an end-of-text tail (:func:`eos_tail`: predicted
  end-of-text, its first masked position clears). The LLaDA loop fills it when a block ends and every later mask
  is in it, which ends the sample; filling it earlier changes what the blocks before it choose. Dream's loop,
  one block, fills it at any step. The loops read :attr:`CommitRule.clear`.

A commit model is trained for one language model (``diffexit train commit``) and records the model's vocabulary
size, the block lengths it was trained on and a digest of the model's weights; :meth:`CommitRule.bind` refuses any
other model. ``source="learned"`` takes the file shipped beside the model's weights (``commit_rule.safetensors`` in
the folder it was loaded from).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from ..common.results import atomic_write_bytes
from .decoding import vocab_size
from .halting import HaltDecision, HaltingRule

FEATURES = ("margin", "entropy", "top1_prob", "held", "progress", "position", "ahead", "is_eos", "block_masked")
MODES = ("commit", "halt")
FILENAME = "commit_rule.safetensors"
FORMAT = "diffexit-commit-rule/1"
HELD_CAP = 16  # steps; an argmax held longer than this is as stable as the feature can say
MARGIN_CAP = 30.0  # logits; float32 margins above this all mean "certain"
HIDDEN = 32


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 (hex, first 16 digits) of the model's parameters by name, as float32, so one checkpoint loaded in
    fp16 or fp32 gives the same digest."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class CommitNet(torch.nn.Module):
    """Standardise ``features`` features ``[..., F]`` (:data:`FEATURES` by default; DiffusionGemma's rule has its own,
    :data:`diffexit.dllm.gemma_commit.GEMMA_FEATURES`) with the training set's mean and spread, then an MLP to one
    logit ``[...]`` (the log-odds that the argmax is final)."""

    def __init__(self, hidden: int = HIDDEN, features: int = len(FEATURES)):
        super().__init__()
        f = features
        self.register_buffer("mean", torch.zeros(f))
        self.register_buffer("std", torch.ones(f))
        self.mlp = torch.nn.Sequential(torch.nn.Linear(f, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden),
                                       torch.nn.SiLU(), torch.nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp((features - self.mean) / self.std).squeeze(-1)


@dataclass
class CommitModel:
    """A trained :class:`CommitNet` and what it was trained for.

    Attributes:
        net: the classifier.
        vocab_size: the language model's vocabulary.
        block_lengths: the decode block lengths it was trained on (a bidirectional model decodes different spans in
            different blocks).
        lm_digest: :func:`weights_digest` of the language model.
        eos_token_ids: end-of-text ids (EOS, padding) for the ``is_eos`` feature and tail filling.
        thresholds: the calibrated threshold per mode and block length (``{"commit": {"4": t}, "halt": {...}}``);
            1.0 (never clears) where too few calibration prompts could certify any other.
        record: how it was made (command, seed, data, figures), for the card.
        features: the names of the net's input features, in order (:data:`FEATURES` for the LLaDA and Dream loops).
    """

    net: CommitNet
    vocab_size: int
    block_lengths: tuple[int, ...]
    lm_digest: str
    eos_token_ids: tuple[int, ...]
    thresholds: dict
    record: dict
    features: tuple[str, ...] = FEATURES

    def save(self, path: Path | str) -> Path:
        """Write fp32 safetensors with the metadata as JSON, atomically."""
        path = Path(path)
        meta = {"format": FORMAT, "features": list(self.features), "vocab_size": self.vocab_size,
                "block_lengths": list(self.block_lengths), "lm_digest": self.lm_digest,
                "eos_token_ids": list(self.eos_token_ids), "thresholds": self.thresholds, "record": self.record}
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().float().contiguous() for k, v in self.net.state_dict().items()}, str(tmp),
                  metadata={"commit_rule": json.dumps(meta)})
        atomic_write_bytes(path, tmp.read_bytes())
        tmp.unlink()
        return path

    @classmethod
    def load(cls, path: Path | str) -> "CommitModel":
        path = Path(path)
        fix = "train one with `diffexit train commit --model MODEL --out FILE`"
        if not path.is_file():
            raise ValueError(f"no commit model at {path}; {fix}")
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("commit_rule", "null"))
        except Exception as e:  # a file that is not safetensors at all
            raise ValueError(f"{path} is not a commit model ({e}); {fix}") from None
        features = meta.get("features") if isinstance(meta, dict) else None
        if (meta is None or meta.get("format") != FORMAT or not isinstance(features, list) or not features
                or not all(isinstance(f, str) for f in features)):
            raise ValueError(f"{path} is not a {FORMAT} commit model (metadata with its feature names); {fix}")
        state = load_file(str(path))
        net = CommitNet(hidden=state["mlp.0.weight"].shape[0], features=len(features))
        net.load_state_dict(state)
        return cls(net.eval(), int(meta["vocab_size"]), tuple(meta["block_lengths"]), meta["lm_digest"],
                   tuple(meta["eos_token_ids"]), dict(meta["thresholds"]), dict(meta.get("record", {})),
                   tuple(features))

    def check(self, model, block_length: int, where: str) -> None:
        """``ValueError`` naming the fix unless this commit model was trained for ``model`` at ``block_length``."""
        fix = f"train a commit model for it with `diffexit train commit` and pass that file (this one: {where})"
        vocab = vocab_size(model)
        if vocab is not None and vocab != self.vocab_size:
            raise ValueError(f"the commit model was trained for a vocabulary of {self.vocab_size}, the model has "
                             f"{vocab}; {fix}")
        if block_length not in self.block_lengths:
            raise ValueError(f"the commit model was trained on blocks of {list(self.block_lengths)}, the decode uses "
                             f"{block_length}; decode with block_length in {list(self.block_lengths)}, or {fix}")
        digest = weights_digest(model)
        if digest != self.lm_digest:
            raise ValueError(f"the commit model was trained for weights {self.lm_digest}, the model's are {digest}; "
                             f"{fix}")


def resolve(source: str, model) -> Path:
    """The commit model file ``source`` names: a path, or ``learned`` for the one beside ``model``'s weights."""
    if source != "learned":
        return Path(source).expanduser()
    folder = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    path = Path(folder) / FILENAME
    if not folder or not path.is_file():
        raise ValueError(f"commit='learned' takes the {FILENAME} shipped beside the model's weights, and there is "
                         f"none{f' in {folder}' if folder else ''}; train one with `diffexit train commit` and pass "
                         f"its path as commit=")
    return path


class CommitFeatures(HaltingRule):
    """Per-row state of the features (the argmax of the previous step and how long it has held) and
    :meth:`features`; the base of the rule and of the trainer's recorder.

    ``block_length`` must be set (:meth:`CommitRule.bind`) before :meth:`start`. A row is a sample, or on a
    block-causal model a (sample, block) pair whose view is that block alone.
    """

    block_length: int
    eos_token_ids: tuple[int, ...] = ()

    def start(self, batch_size, span_length, device, total_steps):
        super().start(batch_size, span_length, device, total_steps)
        self.blocks = max(span_length // self.block_length, 1)  # blocks in the rule's view
        self.steps_per_block = max(total_steps // self.blocks, 1)
        self.previous = torch.full((batch_size, span_length), -1, dtype=torch.long, device=device)
        self.held = torch.zeros(batch_size, span_length, dtype=torch.long, device=device)
        position = torch.arange(span_length, device=device)
        self.position = (position % self.block_length).float() / self.block_length
        self.block_of = position // self.block_length

    def features(self, stats, masked: torch.Tensor, step: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``[A, L, F]`` float32 features of every position (meaningful at masked ones); updates the held counts."""
        top1 = stats.top1_id
        same = top1 == self.previous[rows]
        self.held[rows] = torch.where(same, self.held[rows] + 1, 0)
        self.previous[rows] = top1
        current = (step // self.steps_per_block).clamp(max=self.blocks - 1)
        in_block_step = step - current * self.steps_per_block
        progress = in_block_step.float() / max(self.steps_per_block - 1, 1)
        eos = torch.isin(top1, torch.as_tensor(self.eos_token_ids, dtype=torch.long, device=top1.device))
        block_masked = masked.float().view(len(rows), self.blocks, -1).mean(-1).repeat_interleave(
            masked.shape[1] // self.blocks, dim=1)
        a, length = masked.shape
        columns = [
            stats.logit_margin.float().clamp(0, MARGIN_CAP),
            stats.entropy.float(),
            stats.top1_prob.float(),
            self.held[rows].clamp(max=HELD_CAP).float(),
            progress[:, None].expand(a, length),
            self.position[None, :].expand(a, length),
            (self.block_of[None, :] - current[:, None]).float() / self.blocks,
            eos.float(),
            block_masked,
        ]
        return torch.stack(columns, -1)


class CommitRule(CommitFeatures):
    """The learned rule (see the module docstring).

    Args:
        source: a commit model file, ``learned`` (the one shipped beside the model's weights) or a loaded
            :class:`CommitModel`.
        mode: ``commit`` (commit what clears, fill an end-of-text tail, halt when all clears) or ``halt`` (only
            halt).
        threshold: a position clears when the predicted probability that its argmax is final exceeds this, in
            ``(0, 1]``; 1 never clears. None: the model's calibrated threshold for ``mode``.
    """

    def __init__(self, source="learned", mode: str = "commit", threshold: Optional[float] = None):
        check_mode_threshold(mode, threshold)
        self.source, self.mode, self.threshold = source, mode, threshold
        self.commits = mode == "commit"
        self.model: Optional[CommitModel] = source if isinstance(source, CommitModel) else None

    def __repr__(self):
        return f"CommitRule(source={self.source if isinstance(self.source, str) else 'CommitModel'!r}, " \
               f"mode={self.mode!r}, threshold={self.threshold})"

    def bind(self, model, block_length: int) -> "CommitRule":
        """Load the commit model (if named by path), refuse one made for another model or block length, and take its
        calibrated threshold where none was given. The loops call it before :meth:`start`."""
        where = "given in memory"
        if self.model is None:
            path = resolve(str(self.source), model)
            self.model, where = CommitModel.load(path), str(path)
        if self.model.features != FEATURES:
            raise ValueError(f"the commit model ({where}) reads features {list(self.model.features)}, not the masked "
                             f"loops' {list(FEATURES)} (a DiffusionGemma rule: use it with "
                             f"diffexit.dllm.gemma_commit.LearnedStopping); train one for this model with "
                             f"`diffexit train commit`")
        self.model.check(model, block_length, where)
        if self.threshold is None:
            known = self.model.thresholds.get(self.mode, {})
            if str(block_length) not in known:
                raise ValueError(f"the commit model ({where}) has no calibrated threshold for mode {self.mode!r} at "
                                 f"blocks of {block_length}; pass threshold=, or calibrate with `diffexit train commit`")
            self.threshold = float(known[str(block_length)])
        self.block_length, self.eos_token_ids = block_length, self.model.eos_token_ids
        return self

    def start(self, batch_size, span_length, device, total_steps):
        if self.model is None or getattr(self, "block_length", None) is None:
            raise RuntimeError("CommitRule.bind(model, block_length) must run before start")
        super().start(batch_size, span_length, device, total_steps)
        self.net = self.model.net.to(device)
        self.clear: Optional[torch.Tensor] = None

    def decide(self, stats, masked, step, rows):
        feats = self.features(stats, masked, step, rows)
        with torch.no_grad():
            p = torch.sigmoid(self.net(feats))
        self.clear = (p > self.threshold) & masked
        count = masked.sum(-1)
        # The statistic shown in traces: the least probability that a masked argmax is final.
        value = torch.where(masked, p, torch.ones_like(p)).amin(-1)
        halt = (count > 0) & (self.clear.sum(-1) == count)
        return HaltDecision(halt=halt, value=value, threshold=torch.full_like(value, float(self.threshold)))


def check_mode_threshold(mode: str, threshold) -> None:
    """``ValueError`` naming the fix for a mode outside :data:`MODES` or a threshold outside ``(0, 1]``."""
    if mode not in MODES:
        raise ValueError(f"commit mode must be one of {list(MODES)}, got {mode!r}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0.0 < threshold <= 1.0):
        raise ValueError(f"the commit threshold is a probability in (0, 1] (1 never clears), got {threshold!r}; "
                         f"leave it unset for the calibrated one")


def eos_tail(span: torch.Tensor, top1: torch.Tensor, clear: torch.Tensor, mask_id: int,
             eos_token_ids: Sequence[int]) -> torch.Tensor:
    """The masked positions of the end-of-text tail to fill: ``[A, L]`` bool.

    The tail of a row of ``span`` ``[A, L]`` is its longest suffix in which every position is committed end-of-text
    or masked with an end-of-text argmax (``top1``). It is filled once its first masked position, the boundary
    between answer and padding, clears (``clear``): the positions after it need not clear one by one.
    """
    eos = torch.as_tensor(list(eos_token_ids), dtype=span.dtype, device=span.device)
    masked = span == mask_id
    ok = torch.isin(span, eos) | (masked & torch.isin(top1, eos))
    tail = ok.flip(-1).long().cumprod(-1).flip(-1).bool() & masked
    first = tail.long().argmax(-1, keepdim=True)  # the leftmost masked tail position (0 where there is none)
    return tail & clear.gather(1, first)
