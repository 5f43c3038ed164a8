"""One object for a decode's options: what ``generate text``, the pipeline, the demo and the benches take.

A :class:`DecodeSpec` holds the loop, the lengths, remasking, the KV cache, parallel commits and the halting rule
(by method name and JSON parameters, :mod:`diffexit.dllm.rule_spec`) or the learned commit rule
(``commit="learned"`` or a commit model file, :mod:`diffexit.dllm.commit_rule`). It is checked and normalised once, when it is
made, so every surface reports the same bad option with the same message; it round-trips through a JSON dict
(``job.json`` records it, so a resumed job cannot mix specs)::

    spec = DecodeSpec(gen_length=16, steps=16, block_length=4, cache="prefix", parallel_threshold=0.9)
    out = generate(model, ids, mask_id=tok.mask_token_id, **spec.loop_kwargs())

Lengths left as None are filled by whoever knows them (:meth:`DecodeSpec.with_lengths`): the embedded models
decode each prompt with its task's layout, a transformers model with 128 tokens at 128 steps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from .commit_rule import CommitRule, check_mode_threshold
from .kv_cache import CACHES, check_refresh
from .rule_spec import METHODS, PARAMS, check_halting_params, halting_rule

LOOPS = ("llada", "dream")
REMASKING = ("low_confidence", "random")
OPTIONS = ("loop", "gen_length", "steps", "block_length", "remasking", "cache", "cache_refresh", "parallel_threshold",
           "method", "params", "commit", "commit_mode", "commit_threshold")


def _positive_int(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive whole number, got {value!r}")


@dataclass(frozen=True)
class DecodeSpec:
    """A decode's options, checked.

    Attributes:
        loop: ``llada`` (bidirectional, semi-autoregressive blocks) or ``dream`` (shifted logits, one span).
        gen_length: tokens to generate; None: the caller's default (the task layout's span).
        steps: refinement steps (forward passes without halting); None: the caller's default.
        block_length: block size, dividing ``gen_length`` (llada loop); None: the caller's default.
        remasking: ``low_confidence`` or ``random`` (llada loop).
        cache: None, ``prefix`` or ``dual`` (llada loop; on a block-causal model ``prefix`` is exact).
        cache_refresh: when the approximate cache's kept K/V are rewritten: None (a block's first step only), a
            whole number ``k`` (every ``k``-th later step of a block) or ``"confidence:C"`` (the step after one that
            committed a token at probability ``<= C``); needs ``cache``, and the loop refuses it on a block-causal
            model (:mod:`diffexit.dllm.kv_cache`).
        parallel_threshold: also commit every masked token of the block at least this probable, in ``(0, 1]``.
        method: the halting rule, ``full`` (none), ``sched`` or ``prophet``.
        params: the rule's parameters, normalised by :func:`~diffexit.dllm.rule_spec.check_halting_params`.
        commit: the learned commit rule instead of a halting method: ``learned`` (the commit model shipped beside
            the model's weights) or a commit model file; None: none.
        commit_mode: ``commit`` (commit what clears, fill an end-of-text tail, halt when all clears) or ``halt``.
        commit_threshold: the rule's threshold in ``(0, 1]`` (1 never clears); None: the model's calibrated one.
    """

    loop: str = "llada"
    gen_length: Optional[int] = None
    steps: Optional[int] = None
    block_length: Optional[int] = None
    remasking: str = "low_confidence"
    cache: Optional[str] = None
    cache_refresh: Union[None, int, str] = None
    parallel_threshold: Optional[float] = None
    method: str = "full"
    params: dict = field(default_factory=dict)
    commit: Optional[str] = None
    commit_mode: str = "commit"
    commit_threshold: Optional[float] = None

    def __post_init__(self):
        if self.loop not in LOOPS:
            raise ValueError(f"loop must be one of {list(LOOPS)}, got {self.loop!r}")
        for name in ("gen_length", "steps", "block_length"):
            _positive_int(name, getattr(self, name))
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking must be one of {list(REMASKING)}, got {self.remasking!r}")
        if self.cache is not None and self.cache not in CACHES:
            raise ValueError(f"cache must be none or one of {list(CACHES)}, got {self.cache!r}")
        object.__setattr__(self, "cache_refresh", check_refresh(self.cache_refresh))
        if self.cache_refresh is not None and self.cache is None:
            raise ValueError(f"cache_refresh={self.cache_refresh!r} refreshes the kept K/V of an approximate cache, "
                             f"and there is no cache: give cache prefix or dual, or drop cache_refresh")
        if isinstance(self.cache_refresh, str) and self.remasking == "random":
            raise ValueError(f"cache_refresh={self.cache_refresh!r} reads the committed tokens' probabilities, and "
                             f"random remasking commits by a uniform draw: use low_confidence remasking or a whole "
                             f"number of steps")
        threshold = self.parallel_threshold
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
                    or not 0.0 < threshold <= 1.0:
                raise ValueError(f"parallel_threshold must be a probability in (0, 1], got {threshold!r}")
            object.__setattr__(self, "parallel_threshold", float(threshold))
            if self.remasking == "random":
                raise ValueError("parallel_threshold compares token probabilities; it needs "
                                 "remasking='low_confidence'")
        if self.loop == "dream":
            given = [name for name, default in (("block_length", None), ("cache", None),
                                                ("parallel_threshold", None), ("remasking", "low_confidence"))
                     if getattr(self, name) != default]
            if given:
                raise ValueError(f"{', '.join(given)}: {'an option' if len(given) == 1 else 'options'} of the llada "
                                 f"loop; the dream loop decodes the span as one block, uncached")
        if self.gen_length is not None and self.block_length is not None and self.gen_length % self.block_length:
            divisors = [d for d in range(1, self.gen_length + 1) if self.gen_length % d == 0]
            raise ValueError(f"block_length must divide gen_length={self.gen_length}, got {self.block_length}; "
                             f"valid block lengths are {divisors}")
        if self.gen_length is not None and self.steps is not None and self.loop == "llada":
            from .generate import check_blocks

            check_blocks(self.gen_length, self.steps, self.block_length or self.gen_length)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {list(METHODS)}")
        if not isinstance(self.params, dict):
            raise ValueError(f"params must be a dict of the {self.method!r} rule's parameters, got {self.params!r}")
        object.__setattr__(self, "params", check_halting_params(self.method, self.params))
        self._check_commit()

    def _check_commit(self):
        check_mode_threshold(self.commit_mode, self.commit_threshold)
        if self.commit_threshold is not None:
            object.__setattr__(self, "commit_threshold", float(self.commit_threshold))
        if self.commit is None:
            if self.commit_mode != "commit" or self.commit_threshold is not None:
                raise ValueError("commit_mode and commit_threshold set the learned commit rule; give commit='learned' "
                                 "(or a commit model file) too, or drop them")
            return
        if not isinstance(self.commit, str) or not self.commit:
            raise ValueError(f"commit is 'learned' or the path of a commit model file, got {self.commit!r}")
        if self.method != "full":
            raise ValueError(f"the learned commit rule halts by itself (commit_mode='halt' only halts); it replaces "
                             f"method {self.method!r}: use method 'full' with commit=, or drop commit")

    # Building ---------------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict) -> "DecodeSpec":
        """The spec :meth:`to_dict` wrote (unknown keys are named, with the valid ones)."""
        if not isinstance(data, dict):
            raise ValueError(f"a decode spec is a dict of {list(OPTIONS)}, got {data!r}")
        unknown = sorted(set(data) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown decode option(s) {unknown}; the options are {list(OPTIONS)}")
        return cls(**data)

    def to_dict(self) -> dict:
        """Every option, JSON-ready."""
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "DecodeSpec":
        """A copy with ``changes``, checked again."""
        return dataclasses.replace(self, **changes)

    def with_lengths(self, gen_length: int, steps: int, block_length: Optional[int]) -> "DecodeSpec":
        """The spec with its unset lengths taken from these defaults (a caller's: the task layout's)."""
        return self.replace(gen_length=self.gen_length or gen_length, steps=self.steps or steps,
                            block_length=self.block_length or block_length)

    def for_tokenizer(self, tokenizer) -> "DecodeSpec":
        """The spec with the tokenizer's EOS and padding ids filled in where the rule needs them
        (``stat="mean_content"``)."""
        ids = [getattr(tokenizer, f"{name}_token_id", None) for name in ("eos", "pad")]
        params = check_halting_params(self.method, self.params, ignore_token_ids=[i for i in ids if i is not None])
        return self if params == self.params else self.replace(params=params)

    # Using ------------------------------------------------------------------------------------------------------

    def halting_rule(self):
        """A fresh halting rule (rules keep per-run state; the learned commit rule is one), or None for full
        steps."""
        if self.commit is not None:
            return CommitRule(self.commit, self.commit_mode, self.commit_threshold)
        return halting_rule(self.method, self.params)

    @property
    def rule_name(self) -> str:
        """The row name of the rule: the method, or ``learned-commit`` / ``learned-halt``."""
        return self.method if self.commit is None else f"learned-{self.commit_mode}"

    def loop_kwargs(self) -> dict:
        """The keyword arguments of :func:`~diffexit.dllm.generate.generate` (llada loop) or
        :func:`~diffexit.dllm.dream.dream_generate`, with a fresh halting rule; the lengths must be set."""
        missing = [name for name in ("gen_length", "steps") if getattr(self, name) is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} not set: give them, or fill them with spec.with_lengths(...)")
        kwargs = {"gen_length": self.gen_length, "steps": self.steps, "halting": self.halting_rule()}
        if self.loop == "llada":
            kwargs.update(block_length=self.block_length, remasking=self.remasking, cache=self.cache,
                          cache_refresh=self.cache_refresh, parallel_threshold=self.parallel_threshold)
        return kwargs

    def describe(self) -> str:
        """The non-default options in a few words, e.g. ``"sched, cache prefix, parallel >= 0.9"``."""
        words = [self.rule_name + ("" if self.commit_threshold is None else f" > {self.commit_threshold:g}")]
        if self.cache:
            words.append(f"cache {self.cache}" + ("" if self.cache_refresh is None
                                                  else f" refreshed {_refresh_words(self.cache_refresh)}"))
        if self.parallel_threshold is not None:
            words.append(f"parallel >= {self.parallel_threshold:g}")
        if self.remasking != "low_confidence":
            words.append(f"{self.remasking} remasking")
        return ", ".join(words)


def _refresh_words(refresh: Union[int, str]) -> str:
    if isinstance(refresh, int):
        return "every step" if refresh == 1 else f"every {refresh} steps"
    return f"after commits at p <= {refresh.split(':')[1]}"


def spec_from_options(options: dict, base: Optional[DecodeSpec] = None) -> DecodeSpec:
    """A spec from flat, user-named options (a command line's, lm-eval's ``--model_args``): the spec's own fields,
    plus the halting rule's parameters by their names (``schedule``, ``stat``, ``window``, ...). Unknown names are
    listed with the valid ones."""
    base = base or DecodeSpec()
    rule_keys = tuple(dict.fromkeys(k for keys in PARAMS.values() for k in keys))
    unknown = sorted(set(options) - set(OPTIONS) - set(rule_keys))
    if unknown:
        raise ValueError(f"unknown decode option(s) {unknown}; the options are "
                         f"{[k for k in OPTIONS if k != 'params'] + list(rule_keys)}")
    fields = {k: v for k, v in options.items() if k in OPTIONS and k != "params"}
    params = {**base.params, **options.get("params", {}), **{k: v for k, v in options.items() if k in rule_keys}}
    method = fields.get("method", base.method)
    if method != base.method and "params" not in options:
        # A new method starts from its own defaults, not the old method's parameters.
        params = {k: v for k, v in options.items() if k in rule_keys}
    return base.replace(**fields, params=params)


def option_names() -> Sequence[str]:
    """Every name :func:`spec_from_options` takes."""
    return [k for k in OPTIONS if k != "params"] + list(dict.fromkeys(k for keys in PARAMS.values() for k in keys))
