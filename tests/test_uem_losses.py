"""The DeeDiff loss on hand-made tensors."""

import math

import pytest
import torch

from diffexit.uem import TARGETS, deediff_loss
from diffexit.uem.losses import patch_mean


def test_patch_mean_pools_each_patch_and_channel_in_token_order():
    x = torch.arange(16.0).reshape(1, 2, 2, 4)  # C=2, H=2, W=4: two 2x2 patches side by side
    # token 0: channel 0 {0, 1, 4, 5}, channel 1 {8, 9, 12, 13}; token 1: the next two columns
    want = [(0 + 1 + 4 + 5 + 8 + 9 + 12 + 13) / 8, (2 + 3 + 6 + 7 + 10 + 11 + 14 + 15) / 8]
    assert patch_mean(x, 2).tolist() == [want]
    with pytest.raises(ValueError, match="3x3 patches"):
        patch_mean(x, 3)


def test_loss_terms_match_the_formulas():
    noise = torch.zeros(1, 1, 2, 2)
    eps = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]]).reshape(2, 1, 1, 2, 2)
    u = torch.tensor([0.2, 0.6]).reshape(2, 1, 1)  # one 2x2 token per layer
    loss = deediff_loss(eps, u, noise, patch_size=2, lam=0.7, beta=0.3)
    simple = (0.25 + 0.25) / 4
    targets = (math.tanh(1.0) / 4, 2 * math.tanh(0.5) / 4)
    l_u = ((0.2 - targets[0]) ** 2 + (0.6 - targets[1]) ** 2) / 2
    ual = ((1 - 0.2) * (1.0 / 4) + (1 - 0.6) * (0.5 / 4)) / 2
    assert loss.simple.item() == pytest.approx(simple)
    assert loss.uncertainty.item() == pytest.approx(l_u)
    assert loss.ual.item() == pytest.approx(ual)
    assert loss.total.item() == pytest.approx(simple + 0.7 * l_u + 0.3 * ual)


def test_paper_target_is_per_token_and_detached():
    noise = torch.randn(2, 1, 4, 4)
    eps = torch.randn(3, 2, 1, 4, 4, requires_grad=True)
    u = torch.rand(3, 2, 4, requires_grad=True)
    target = TARGETS["paper"](eps, noise, 2)
    assert target.shape == (3, 2, 4)
    torch.testing.assert_close(target[1, 0, 3], torch.tanh((eps[1, 0, 0, 2:, 2:] - noise[0, 0, 2:, 2:]).abs()).mean())
    loss = deediff_loss(eps, u, noise, patch_size=2, lam=1.0, beta=0.0)
    loss.uncertainty.backward()
    assert eps.grad is None  # L_u reaches the heads only
    assert u.grad.abs().sum() > 0


def test_ual_pushes_uncertainty_up_where_a_layer_is_wrong():
    noise = torch.zeros(1, 1, 2, 2)
    eps = torch.stack([torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)])
    u = torch.full((2, 1, 1), 0.5, requires_grad=True)
    deediff_loss(eps, u, noise, patch_size=2, lam=0.0, beta=1.0).ual.backward()
    assert u.grad[0].item() < 0 and u.grad[1].item() == 0.0


def test_bad_inputs_are_refused():
    noise = torch.zeros(1, 1, 2, 2)
    eps = torch.zeros(2, 1, 1, 2, 2)
    with pytest.raises(ValueError, match="unknown UEM target"):
        deediff_loss(eps, torch.zeros(2, 1, 1), noise, patch_size=2, lam=1, beta=1, target="exit-cost-typo")
    with pytest.raises(ValueError, match="eps_layers must be"):
        deediff_loss(eps[0], torch.zeros(2, 1, 1), noise, patch_size=2, lam=1, beta=1)
    with pytest.raises(ValueError, match="uncertainty must be"):
        deediff_loss(eps, torch.zeros(2, 1, 4), noise, patch_size=2, lam=1, beta=1)
