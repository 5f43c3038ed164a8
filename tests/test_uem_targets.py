"""The UEM targets on hand-made tensors, and `--target` through the trainer into the UEM config."""

import math

import pytest
import torch

from diffexit.uem import TARGETS, UEMStack, deediff_loss
from diffexit.app.train_uem import main as train_main


def test_every_target_is_per_token_in_the_unit_interval_and_detached():
    torch.manual_seed(0)
    noise = torch.randn(2, 1, 4, 4)
    eps = (3 * torch.randn(3, 2, 1, 4, 4)).requires_grad_()
    u = torch.rand(3, 2, 4, requires_grad=True)
    for name, target in TARGETS.items():
        value = target(eps, noise, 2)
        assert value.shape == (3, 2, 4), name
        assert value.min() >= 0 and value.max() <= 1, name
        deediff_loss(eps, u, noise, patch_size=2, lam=1.0, beta=0.0, target=name).uncertainty.backward()
        assert eps.grad is None, name  # L_u reaches the heads only


def test_exit_cost_is_the_distance_from_the_full_depth_prediction():
    noise = torch.full((1, 1, 2, 4), 5.0)  # not read: the cost is against eps_L, not the true noise
    eps_full = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).reshape(1, 1, 2, 4)
    eps_mid = eps_full + torch.tensor([[0.5, -0.5, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).reshape(1, 1, 2, 4)
    target = TARGETS["exit-cost"](torch.stack([eps_mid, eps_full]), noise, 2)
    want_mid = [2 * math.tanh(0.5) / 4, math.tanh(2.0) / 4]  # token 0: two pixels off by 0.5; token 1: one by 2
    torch.testing.assert_close(target[0, 0], torch.tensor(want_mid))
    assert target[1].abs().max() == 0  # zero at the last block by construction
    torch.testing.assert_close(target, TARGETS["exit-cost"](torch.stack([eps_mid, eps_full]), -noise, 2))


def test_normalized_is_the_share_of_a_blocks_error_that_full_depth_removes():
    noise = torch.zeros(1, 1, 2, 6)  # three 2x2 tokens
    full = torch.full((1, 1, 2, 6), 0.2)
    early = torch.tensor([[0.8] * 2 + [0.1] * 2 + [0.0] * 2] * 2).reshape(1, 1, 2, 6)
    target = TARGETS["normalized"](torch.stack([early, full]), noise, 2)
    e_full, e_early = math.tanh(0.2), math.tanh(0.8)
    # token 0: worse than full depth; token 1: better (clamped to 0); token 2: no error at all (0, not 0/0)
    torch.testing.assert_close(target[0, 0], torch.tensor([1 - e_full / e_early, 0.0, 0.0]))
    assert target[1].abs().max() == 0
    scaled = TARGETS["normalized"](torch.stack([2 * early, 2 * full]), noise, 2)
    assert scaled[0, 0, 0] != target[0, 0, 0]  # the ratio of tanh errors, not of raw errors


def test_the_uem_config_records_the_target(tmp_path):
    uem = UEMStack(num_blocks=2, hidden_size=4, model_class="DiTTransformer2DModel", target="exit-cost")
    uem.save_pretrained(tmp_path / "uem")
    assert UEMStack.from_pretrained(tmp_path / "uem").config.target == "exit-cost"
    with pytest.raises(ValueError, match="unknown UEM target"):
        UEMStack(num_blocks=2, hidden_size=4, model_class="DiTTransformer2DModel", target="exit_cost")


@pytest.mark.parametrize("target", ["exit-cost", "normalized"])
def test_train_uem_takes_the_target(tmp_path, tiny_dit, target):
    tiny_dit(layers=2).save_pretrained(tmp_path / "dit")
    out = tmp_path / "run"
    assert train_main(["--out", str(out), "--model", str(tmp_path / "dit"), "--target", target, "--steps", "2",
                       "--batch-size", "4"]) == 0
    assert UEMStack.from_pretrained(out / "uem").config.target == target
