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
  from :data:`TARGETS`, computed per pixel and channel, then averaged over the token's patch so it lives where
  ``u`` does:

  - ``"paper"``: DeeDiff's ``tanh(|eps_l - eps|)``. It is dominated by the noise that no depth can predict at that
    timestep, so it barely changes with ``l``: a head trained on it learns the timestep, not the depth.
  - ``"exit-cost"``: ``tanh(|eps_l - eps_L|)``, how far exiting after block ``l`` moves the prediction from the
    full-depth one: the cost of that exit, and zero at the last block by construction. Squashed with ``tanh``
    rather than normalised: ``tanh(x) = x`` to within 1% below ``x = 0.17`` and 3% below 0.3, which is where
    usable exits lie, so ``u`` reads directly as an exit error in noise units there; it only compresses exits
    that are far off (``tanh(1) = 0.76``), which no threshold should take anyway. A per-batch or per-timestep
    normalisation would instead make the same ``u`` mean different errors in different batches and steps.
  - ``"normalized"``: the paper's error relative to the full-depth error of the same token,
    ``relu(1 - e_L / e_l)`` with ``e_l = patch mean of tanh(|eps_l - eps|)``. ``e_l / e_L`` is the paper's error
    divided by the error that remains at full depth at that timestep (the part no block predicts);
    ``1 - e_L / e_l`` maps that ratio from ``[1, inf)`` onto ``[0, 1)``: the share of block ``l``'s error that
    the remaining blocks would remove. It is zero at the last block, and where block ``l`` does no worse than
    full depth (clamped). Token by token, because the floor varies across the image (flat background against
    strokes).
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


def exit_cost_target(eps_layers: torch.Tensor, noise: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The cost of exiting: ``tanh(|eps_l - eps_L|)`` per pixel, averaged per token; ``noise`` is not read. ``[L, B, N]``."""
    return patch_mean(torch.tanh((eps_layers - eps_layers[-1]).abs()), patch_size)


def normalized_target(eps_layers: torch.Tensor, noise: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The paper's per-token error relative to full depth's: ``relu(1 - e_L / e_l)``. ``[L, B, N]``."""
    err = paper_target(eps_layers, noise, patch_size)
    # Where a block's error is exactly zero, full depth cannot beat it: the target is 0, not 0/0.
    return torch.relu(1.0 - err[-1] / err.clamp_min(torch.finfo(err.dtype).tiny)).where(err > 0, 0.0)


# UEM targets by name: (eps_layers [L, B, C, H, W], noise [B, C, H, W], patch_size) -> [L, B, N] in [0, 1].
TARGETS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = {
    "paper": paper_target,
    "exit-cost": exit_cost_target,
    "normalized": normalized_target,
}


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
