"""One checked object for a run's early exits: what ``attach_early_exits`` (``diffexit.samplers.early_exits``) takes.

An :class:`EarlyExitConfig` names the exit rule by its method and parameters (:mod:`diffexit.uem.rule_spec`) and
the UEM folder whose heads it reads. It is checked and normalised once, when it is made, so every surface (the
``generate images`` command, the demo, the bench) reports a bad option with the same message; it touches no file.
It round-trips through a JSON dict (``job.json`` records it, so a resumed job rebuilds the same config)::

    EarlyExitConfig("deediff", threshold="linear:0.3:0.05", min_depth=2, uem="runs/uem")
    EarlyExitConfig("deediff", budget=0.02, uem="runs/uem")        # calibration-0.02.json beside the heads
    EarlyExitConfig("static", depths=(4, 8, 12))                   # no heads
    EarlyExitConfig("static", depths=(6,), remainder="taylor", refresh_every=3, refresh_last=1)

A ``remainder`` composes the exits with feature caching (:mod:`diffexit.uem.cached_remainder`): the blocks a sample
skips add the residual they added when they last ran it, and whole steps run at full depth to refresh them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .cached_remainder import ORDERS, CachedRemainder
from .rule_spec import CALIBRATED, check_exit_params

REMAINDERS = ("none", *ORDERS)
# The fields that say what the skipped blocks add, rather than which rule exits.
REMAINDER_FIELDS = ("remainder", "refresh_every", "refresh_last", "refresh_first", "exit_every")
_NOT_RULE = ("method", "uem", *REMAINDER_FIELDS)


@dataclass(frozen=True)
class EarlyExitConfig:
    """A run's early exits, checked.

    Attributes:
        method: ``full`` (every block, through the same hook), ``deediff`` (UEM uncertainty), ``static`` or
            ``similarity`` (MuE: the relative change each block makes, no heads).
        threshold: deediff: the uncertainty below which a sample exits, a number in ``[0, 1]``, ``KIND:HIGH:LOW[:K]``
            or a ``ThresholdSchedule`` (dict) over sampling progress; stored in its JSON form.
        min_depth: deediff with a threshold, or similarity with a tolerance: never exit before this many blocks.
        budget: deediff, instead of a threshold: the calibration for this exit-error budget beside the heads.
        calibration: deediff, instead of a threshold or budget, or similarity, instead of a tolerance: the path of a
            calibration file.
        depths: static: blocks run per equal stretch of sampling progress, noisiest first.
        tolerance: similarity: a sample exits after the first block that changed its hidden state by less than this
            share of it (a number in ``[0, 1]``, ``KIND:HIGH:LOW[:K]`` or a schedule dict); stored in its JSON form.
        uem: deediff: the UEM folder (a ``diffexit train uem --out`` run, or ``UEMStack.save_pretrained``).
        remainder: what an exited sample's skipped blocks add: ``none`` (nothing), ``cached`` (the residual each
            added when it last ran that sample) or ``taylor`` (that residual extrapolated to first order from its
            last two runs).
        refresh_every: with a remainder, every this many steps runs at full depth (1: every step, which is full
            depth); ``None``: only the first step and the last ``refresh_last``.
        refresh_last: with a remainder, the last this many steps run at full depth (``None``: 0).
        refresh_first: with a remainder, the first this many steps run at full depth (``None``: 1; 0 lets the exit
            rule decide the first step too).
        exit_every: with a remainder, the exit rule runs at one step in every this many (counted as TaylorSeer's
            ``cache_interval``), and the steps between run no block, only the remainder (``None``: the rule runs at
            every step that is no refresh).
    """

    method: str = "full"
    threshold: Union[None, float, str, dict] = None
    min_depth: Optional[int] = None
    budget: Optional[float] = None
    calibration: Optional[str] = None
    depths: Optional[tuple] = None
    tolerance: Union[None, float, str, dict] = None
    uem: Optional[str] = None
    remainder: str = "none"
    refresh_every: Optional[int] = None
    refresh_last: Optional[int] = None
    refresh_first: Optional[int] = None
    exit_every: Optional[int] = None

    def __post_init__(self):
        raw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _NOT_RULE}
        params = check_exit_params(self.method, {k: v for k, v in raw.items() if v is not None})
        for name in raw:
            value = params.get(name)
            object.__setattr__(self, name, tuple(value) if name == "depths" and value is not None else value)
        if self.method == "deediff" and self.uem is None:
            raise ValueError("method 'deediff' reads the UEM heads: give uem, the folder that `diffexit train uem "
                             "--out RUN` writes (RUN/uem)")
        if self.method != "deediff" and self.uem is not None:
            raise ValueError(f"uem only applies to method 'deediff', not {self.method!r}; drop it")
        if self.uem is not None:
            object.__setattr__(self, "uem", str(Path(self.uem)))
        if self.remainder not in REMAINDERS:
            raise ValueError(f"unknown remainder {self.remainder!r}; choose one of {list(REMAINDERS)}")
        if self.remainder == "none":
            given = [k for k in REMAINDER_FIELDS[1:] if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{given[0]} refreshes a cached remainder; set remainder to 'cached' or 'taylor', "
                                 f"or drop it")
        elif self.method == "full":
            raise ValueError("method 'full' runs every block, so no block is skipped to add a remainder; pick an "
                             "exit method or drop remainder")
        else:
            self.cached_remainder()  # the refresh settings' own checks fail here, with the fix

    @property
    def params(self) -> dict:
        """The rule's parameters, as :func:`~diffexit.uem.rule_spec.exit_rule` takes them (JSON-ready)."""
        named = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _NOT_RULE}
        return {k: (list(v) if k == "depths" else v) for k, v in named.items() if v is not None}

    def cached_remainder(self) -> Optional[CachedRemainder]:
        """A fresh :class:`~diffexit.uem.cached_remainder.CachedRemainder` for these settings, or ``None``."""
        if self.remainder == "none":
            return None
        last, first = self.refresh_last, self.refresh_first
        return CachedRemainder(ORDERS[self.remainder], self.refresh_every, 0 if last is None else last,
                               1 if first is None else first, self.exit_every)

    @property
    def calibrated(self) -> bool:
        """Whether the rule comes from a calibration file (a ``budget`` or a ``calibration``)."""
        return any(k in self.params for k in CALIBRATED)

    def to_dict(self) -> dict:
        """``{"method", <the parameters given>, "uem"?, <remainder settings>?}``, JSON-ready; :meth:`from_dict` gives
        the config back."""
        remainder = {k: getattr(self, k) for k in REMAINDER_FIELDS if getattr(self, k) not in (None, "none")}
        return {"method": self.method, **self.params, **({} if self.uem is None else {"uem": self.uem}), **remainder}

    @classmethod
    def from_dict(cls, data: dict) -> "EarlyExitConfig":
        """The config :meth:`to_dict` wrote; an unknown key is refused, naming the known ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown early-exit option {unknown[0]!r}; the options are {known}")
        return cls(**data)
