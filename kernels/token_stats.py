"""Per-row statistics of a logits tensor in one pass: argmax, top-2, margins and entropy.

``token_stats(logits, *, temperature=1.0, backend="auto")`` reads ``logits`` ``[..., V]`` once and returns a
:class:`TokenStats` whose fields all have shape ``logits.shape[:-1]``. It never materialises the softmax (the
torch backend holds one chunk of rows' worth at a time; the Triton kernel none).

Definitions, with ``z = logits / temperature`` computed in float32:

- ``top1_id`` (int64): the argmax. Ties go to the lowest index.
- ``top1_logit``, ``top2_logit``: the largest and second largest *input* logits (not divided by the
  temperature), as float32. Values count with multiplicity: a tie for first gives ``top2_logit == top1_logit``.
- ``logit_margin = top1_logit - top2_logit``.
- ``top1_prob``, ``top2_prob``: ``softmax(z)`` at those two entries; ``prob_margin = top1_prob - top2_prob``.
- ``entropy``: ``-sum softmax(z) * log softmax(z)`` in nats, computed as ``logsumexp(z) - sum softmax(z) * z``
  relative to the row maximum, so large logits (1e4 and beyond) do not overflow.

Edge cases (identical on every backend; the tests hold them to it):

- ``-inf`` entries are masked vocabulary: probability 0, no entropy contribution, never the argmax of a row
  that has a finite entry.
- Exactly one finite entry (``V == 1`` with a finite logit, say): ``top2_logit = -inf``, ``logit_margin = +inf``,
  ``top1_prob = 1``, ``top2_prob = 0``, ``prob_margin = 1``, ``entropy = 0``.
- A row that is all ``-inf`` has no distribution: ``top1_id = 0`` (every entry ties), ``top1_logit =
  top2_logit = -inf``, and ``logit_margin``, both probabilities, ``prob_margin`` and ``entropy`` are NaN.
- A row holding a NaN or a ``+inf`` (after the cast to float32, so a float64 above 3.4e38 counts) is invalid:
  ``top1_id`` is the index of its first NaN or ``+inf``, and every float field is NaN.

Inputs may be float16, bfloat16, float32 or float64 (accumulated in float32), with any strides. The result does
not carry gradients.

Backends: ``"triton"`` runs the fused kernel (CUDA tensors, or any tensor when the environment has
``TRITON_INTERPRET=1``); ``"torch"`` is the chunked reference, on any device; ``"auto"`` takes Triton where it can
run and torch elsewhere.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from .interpreter import interpreting
from .token_stats_torch import token_stats_torch

BACKENDS = ("auto", "torch", "triton")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class TokenStats(NamedTuple):
    """Per-row statistics; every field has the shape of ``logits.shape[:-1]`` (see the module docstring)."""

    top1_id: Tensor
    top1_logit: Tensor
    top2_logit: Tensor
    logit_margin: Tensor
    top1_prob: Tensor
    top2_prob: Tensor
    prob_margin: Tensor
    entropy: Tensor


def token_stats(logits: Tensor, *, temperature: float = 1.0, backend: str = "auto") -> TokenStats:
    """Argmax, top-2 logits and probabilities, their margins and the entropy of each row of ``logits``.

    Args:
        logits: ``[..., V]`` tensor, at least 1-D with ``V >= 1``; float16, bfloat16, float32 or float64.
        temperature: positive, finite; probabilities and entropy are those of ``softmax(logits / temperature)``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        :class:`TokenStats`, each field of shape ``logits.shape[:-1]`` on ``logits.device``.
    """
    _check(logits, temperature, backend)
    if _use_triton(logits, backend):
        from .token_stats_triton import token_stats_triton

        return TokenStats(*token_stats_triton(logits, float(temperature)))
    return TokenStats(*token_stats_torch(logits, float(temperature)))


def _check(logits, temperature, backend) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"token_stats: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in DTYPES:
        raise ValueError(
            f"token_stats: logits dtype {logits.dtype} is not supported; pass float16, bfloat16, float32 or "
            f"float64 logits (for example logits.float())"
        )
    if logits.dim() == 0:
        raise ValueError("token_stats: logits is 0-d; it needs a vocabulary dimension, shape [..., V]")
    if logits.shape[-1] == 0:
        raise ValueError(f"token_stats: logits {tuple(logits.shape)} has an empty vocabulary (V == 0); V must be >= 1")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"token_stats: temperature must be a finite number > 0, got {temperature!r}")
    if backend not in BACKENDS:
        raise ValueError(f"token_stats: backend must be one of {BACKENDS}, got {backend!r}")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(logits: Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    runnable = logits.is_cuda or interpreting()
    if backend == "auto":
        return runnable and _triton_available()
    if not _triton_available():
        raise ValueError("token_stats: backend='triton' needs the triton package; install it or use backend='torch'")
    if not runnable:
        raise ValueError(
            f"token_stats: backend='triton' needs a CUDA tensor (got one on {logits.device}), or TRITON_INTERPRET=1 "
            f"in the environment to run the kernel in Triton's interpreter; or use backend='torch'"
        )
    return True
