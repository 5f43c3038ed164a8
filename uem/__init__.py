"""DeeDiff early exits for diffusers transformers.

- ``UEMStack`` (heads): the per-block uncertainty heads, saved and loaded like any diffusers model.
- ``enable_early_exit`` / ``disable_early_exit`` (early_exit): put exits on a DiT, PixArt or SD3 transformer, or
  on a pipeline's, in one call; ``exit_predictions`` runs every exit at once for training.
- ``EarlyExitConfig`` (exit_config): a run's exits, checked once and JSON round-tripping; what
  ``diffexit.samplers.attach_early_exits`` takes. ``load_uem_folder`` (uem_folder): a UEM folder's heads and the
  fine-tuned backbone it may bring.
- Exit rules (exit_rules): ``UncertaintyThreshold``, ``StaticDepth``, ``MinDepth``, ``FullDepth``,
  ``CalibratedThreshold`` (per-step thresholds from ``diffexit calibrate uem``) and ``SimilarityExit`` (MuE's
  training-free exits, on the relative change a block makes); ``calibrate_similarity`` (calibration) calibrates its
  tolerances per step within an exit-error budget.
- ``CachedRemainder`` (cached_remainder): what the blocks an exited sample skipped add (their last residual, or its
  first-order extrapolation), with its refresh steps; ``enable_early_exit(..., remainder=...)`` takes one and
  ``EarlyExitConfig(remainder="cached" | "taylor", ...)`` builds one. ``REFRESH``, ``EXIT`` and ``SKIP`` are what
  a step does.
- ``deediff_loss`` (losses): ``L_simple + lambda * L_u + beta * L_UAL``; UEM targets by name in ``TARGETS``.
- ``Calibration`` and ``find_calibration`` (calibration_file): the files ``diffexit calibrate uem`` writes, and the
  rule each gives for the weights and sampling setup it was made for; the algorithm is ``calibration``.
- ``exit_rule`` / ``describe_exit_rule`` (rule_spec): rules from user parameters, as every surface builds them.
- ``train``: the DeeDiff trainer (frozen backbone, or the paper's full fine-tune).

The embedded digits models live apart, in ``diffexit.uem.digits``.

The scheduler side is ``diffexit.samplers.ExitAwareScheduler``, and the one call that puts exits on a pipeline is
``diffexit.samplers.attach_early_exits``. Names load on first access, so importing the
package stays cheap until diffusers is needed.
"""

_LAZY = {
    "UEMStack": ".heads",
    "token_uncertainty": ".heads",
    "EarlyExit": ".early_exit",
    "ExitPredictions": ".early_exit",
    "enable_early_exit": ".early_exit",
    "disable_early_exit": ".early_exit",
    "exit_predictions": ".early_exit",
    "SUPPORTED": ".early_exit",
    "EarlyExitConfig": ".exit_config",
    "load_uem_folder": ".uem_folder",
    "ExitRule": ".exit_rules",
    "UncertaintyThreshold": ".exit_rules",
    "StaticDepth": ".exit_rules",
    "MinDepth": ".exit_rules",
    "FullDepth": ".exit_rules",
    "CalibratedThreshold": ".exit_rules",
    "SimilarityExit": ".exit_rules",
    "calibrate_similarity": ".calibration",
    "CachedRemainder": ".cached_remainder",
    "REFRESH": ".cached_remainder",
    "EXIT": ".cached_remainder",
    "SKIP": ".cached_remainder",
    "Calibration": ".calibration_file",
    "find_calibration": ".calibration_file",
    "exit_rule": ".rule_spec",
    "describe_exit_rule": ".rule_spec",
    "TARGETS": ".losses",
    "DeeDiffLoss": ".losses",
    "deediff_loss": ".losses",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
