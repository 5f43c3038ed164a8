"""Fused token statistics over logits: ``token_stats`` (Triton kernel, chunked torch reference, dispatch)."""

import sys as _sys

if __name__ == "kernels":
    # This folder is `diffexit.kernels`, but Python started in the repository root (`python -c`, a notebook, a
    # script there) has the root on sys.path, so `import kernels` finds this folder before Hugging Face's `kernels`,
    # which transformers imports when it loads a model. Load that package in this one's place: an import returns
    # whatever sys.modules holds under its name once the module's code has run.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root])
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (this repository's kernels/ folder is diffexit.kernels)",
                                  name="kernels")
    _hub_kernels = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _hub_kernels
    _spec.loader.exec_module(_hub_kernels)
else:
    from .token_stats import TokenStats, token_stats

    __all__ = ["TokenStats", "token_stats"]
