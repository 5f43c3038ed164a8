"""The DeeDiff training loss, ``L = L_simple + lambda * L_u + beta * L_UAL``.

Inputs, for a batch of ``B`` noisy images and a model with ``L`` blocks whose tokens are ``p x p`` patches:

- ``eps_layers`` ``[L, B, C, H, W]``: the noise predicted by the model's own output head after each block
  (``eps_layers[-1]`` is the full-depth prediction);
- ``uncertainty`` ``[L, B, N]``: each block's per-token UEM output, ``N = (H / p) * (W / p)`` tokens in the
  row-major order of diffusers' ``PatchEmbed``;
- ``noise`` ``[B, C, H, W]``: the true noise ``eps``.

The terms:

- ``L_simple = mse(eps_L, eps)``: the usual DDPM loss on the full-depth output.
- ``L_u = mean over l, b, n of (u_l - target_l)^2``: each head regresses onto a detached target chosen by name
  from :data:`TARGETS`. The paper's target (``"paper"``) is ``tanh(|eps_l - eps|)``, taken per pixel and channel,
  then averaged over the token's patch so it lives where ``u`` does.
- ``L_UAL = mean over l, b, n of (1 - u_l) * mse_l``: each block's squared error ``(eps_l - eps)^2`` (averaged over
  the token's patch and channels) weighted by ``1 - u_l``, so a block is pushed hardest to be right where its head
  claims certainty. ``u`` is not detached here, as in the paper.

Layers are averaged rather than summed (the paper sums), which keeps ``lambda`` and ``beta`` meaningful at any depth.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch


def patch_mean(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Average ``x`` ``[..., C, H, W]`` over each ``p x p`` patch and all channels: ``[..., (H/p) * (W/p)]``."""
    *lead, c, h, w = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} does not split into {p}x{p} patches")
    x = x.reshape(*lead, c, h // p, p, w // p, p)
    return x.mean(dim=(-5, -3, -1)).flatten(-2)


def paper_target(eps_layers: torch.Tensor, noise: torch.Tensor, patch_size: int) -> torch.Tensor:
    """DeeDiff's target: ``tanh(|eps_l - eps|)`` per pixel, averaged per token. ``[L, B, N]``."""
    return patch_mean(torch.tanh((eps_layers - noise).abs()), patch_size)


# UEM targets by name: (eps_layers [L, B, C, H, W], noise [B, C, H, W], patch_size) -> [L, B, N].
TARGETS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = {"paper": paper_target}


class DeeDiffLoss(NamedTuple):
    """The loss and its three terms (scalars); ``total`` is the one to backpropagate."""

    total: torch.Tensor
    simple: torch.Tensor
    uncertainty: torch.Tensor
    ual: torch.Tensor


def deediff_loss(
    eps_layers: torch.Tensor,
    uncertainty: torch.Tensor,
    noise: torch.Tensor,
    *,
    patch_size: int,
    lam: float,
    beta: float,
    target: str = "paper",
) -> DeeDiffLoss:
    """``L = L_simple + lam * L_u + beta * L_UAL`` (see the module docstring for shapes and terms)."""
    if target not in TARGETS:
        raise ValueError(f"unknown UEM target {target!r}; choose one of {sorted(TARGETS)}")
    if eps_layers.dim() != 5 or eps_layers.shape[1:] != noise.shape:
        raise ValueError(
            f"eps_layers must be [L, *noise.shape] = [L, {', '.join(map(str, noise.shape))}], "
            f"got {list(eps_layers.shape)}"
        )
    tokens = (noise.shape[-2] // patch_size) * (noise.shape[-1] // patch_size)
    want = (eps_layers.shape[0], noise.shape[0], tokens)
    if tuple(uncertainty.shape) != want:
        raise ValueError(f"uncertainty must be [L, B, N] = {list(want)}, got {list(uncertainty.shape)}")
    simple = torch.mean((eps_layers[-1] - noise) ** 2)
    goal = TARGETS[target](eps_layers.detach(), noise, patch_size)
    loss_u = torch.mean((uncertainty - goal) ** 2)
    layer_mse = patch_mean((eps_layers - noise) ** 2, patch_size)
    ual = torch.mean((1.0 - uncertainty) * layer_mse)
    return DeeDiffLoss(simple + lam * loss_u + beta * ual, simple, loss_u, ual)
