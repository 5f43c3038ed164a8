"""Uncertainty estimation modules (UEMs): one light per-token head on every transformer block.

The head on block ``l`` reads that block's output tokens ``h`` ``[B, N, D]`` and the model's own conditioning
vector ``c`` ``[B, D]`` (its timestep embedding, plus the class or pooled-text embedding the model adds to it),
and gives each token an uncertainty in ``[0, 1]``:

    a        = A_l silu(c)                                   [B, D + 1]
    u[b, n]  = sigmoid((w_l + a[b, :D]) . h[b, n] + b_l + a[b, D])

This is the paper's timestep-aware form (a linear head with a sigmoid, fed the hidden state and the timestep),
written so that the conditioning folds into one weight vector and one bias per sample, once per forward pass for
all blocks (:meth:`UEMStack.token_heads`). Each block then pays one multiply-and-sum over ``h``, a sigmoid and a
mean over tokens (:func:`token_uncertainty`); the mean is the exit statistic, per sample. ``A_l`` starts at zero,
so an untrained head is a plain linear probe. There is no layer norm in front: on CPU it cost more than the rest
of the head together, and the conditioned weights already rescale per timestep and per block.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .block_adapters import hidden_size, num_blocks
from .losses import TARGETS


def describe_model(transformer: nn.Module) -> dict:
    """The shape a UEM stack must match: ``{"model_class", "num_blocks", "hidden_size"}``.

    Raises ``ValueError`` naming the supported models for any other (early exits could not run on it).
    """
    return {
        "model_class": type(transformer).__name__,
        "num_blocks": num_blocks(transformer),
        "hidden_size": hidden_size(transformer),
    }


def token_uncertainty(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-token uncertainty of one block.

    Args:
        hidden: the block's output tokens, ``[B, N, D]``.
        weight: that block's per-sample token weights from :meth:`UEMStack.token_heads`, ``[B, D]``.
        bias: that block's per-sample bias, ``[B]``.

    Returns:
        ``u``, ``[B, N]``, in ``[0, 1]``.
    """
    # Multiply-and-sum rather than a batched matrix-vector product: on CPU it is several times faster at these sizes.
    return torch.sigmoid((hidden * weight[:, None, :]).sum(-1) + bias[:, None])


class UEMStack(ModelMixin, ConfigMixin):
    """The UEMs of one transformer: a head per block, with the base model's shape in its config.

    Args:
        num_blocks: blocks in the base model (one head each).
        hidden_size: width ``D`` of the base model's tokens (``block_adapters.hidden_size``).
        model_class: class name of the base model, e.g. ``"DiTTransformer2DModel"``.
        target: the training target the heads regress onto (a name in ``diffexit.uem.losses.TARGETS``): ``"paper"``
            (DeeDiff's), ``"exit-cost"`` or ``"normalized"``. A calibration (``diffexit calibrate uem``) records it
            and refuses heads trained on another.

    Saves and loads with ``save_pretrained`` / ``from_pretrained`` (safetensors). :meth:`check_matches` refuses a
    model of another shape.
    """

    @register_to_config
    def __init__(self, num_blocks: int, hidden_size: int, model_class: str, target: str = "paper"):
        super().__init__()
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if not isinstance(model_class, str) or not model_class:
            raise ValueError(f"model_class must name the base model's class, got {model_class!r}")
        if target not in TARGETS:
            raise ValueError(f"unknown UEM target {target!r}; choose one of {sorted(TARGETS)}")
        self.cond_weight = nn.Parameter(torch.zeros(num_blocks, hidden_size + 1, hidden_size))
        self.token_weight = nn.Parameter(torch.randn(num_blocks, hidden_size) * hidden_size**-0.5)
        self.token_bias = nn.Parameter(torch.zeros(num_blocks))

    @classmethod
    def for_model(cls, transformer: nn.Module, target: str = "paper") -> "UEMStack":
        """Fresh (untrained) heads shaped for ``transformer``."""
        return cls(**describe_model(transformer), target=target)

    def check_matches(self, transformer: nn.Module) -> None:
        """Raise ``ValueError`` unless these heads were built for a model shaped like ``transformer``."""
        want = {k: self.config[k] for k in ("model_class", "num_blocks", "hidden_size")}
        got = describe_model(transformer)
        if want != got:
            raise ValueError(
                f"these UEMs were built for a {want['model_class']} with {want['num_blocks']} blocks of width "
                f"{want['hidden_size']}, but the model is a {got['model_class']} with {got['num_blocks']} blocks of "
                f"width {got['hidden_size']}; load the UEMs trained for this model, or train new ones with "
                f"`diffexit train uem`"
            )

    def token_heads(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold the conditioning into every block's token head.

        Args:
            cond: the model's conditioning vector, ``[B, D]``.

        Returns:
            ``(weight [L, B, D], bias [L, B])``: the token head of block ``l`` for sample ``b``.
        """
        d = self.config.hidden_size
        cond = cond.to(self.token_weight.dtype)
        mod = torch.einsum("bd,lkd->lbk", F.silu(cond), self.cond_weight)
        weight = self.token_weight[:, None, :] + mod[..., :d]
        bias = self.token_bias[:, None] + mod[..., d]
        return weight, bias

    def forward(
        self, hidden_states: Union[torch.Tensor, Sequence[torch.Tensor]], cond: torch.Tensor
    ) -> torch.Tensor:
        """Uncertainty of every block at once (training and calibration).

        Args:
            hidden_states: every block's output tokens, ``[L, B, N, D]`` or a sequence of ``L`` ``[B, N, D]``.
            cond: the model's conditioning vector, ``[B, D]``.

        Returns:
            ``u``, ``[L, B, N]``.
        """
        if not torch.is_tensor(hidden_states):
            hidden_states = torch.stack(list(hidden_states))
        if hidden_states.shape[0] != self.config.num_blocks:
            raise ValueError(
                f"expected the hidden states of all {self.config.num_blocks} blocks, got {hidden_states.shape[0]}"
            )
        weight, bias = self.token_heads(cond)
        logits = torch.einsum("lbnd,lbd->lbn", hidden_states.to(weight.dtype), weight)
        return torch.sigmoid(logits + bias[..., None])
