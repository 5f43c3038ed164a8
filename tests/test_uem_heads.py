"""UEM heads: the timestep-aware formula, shapes, save/load, and refusing another model's UEMs."""

import json

import pytest
import torch
from diffusers import DiTTransformer2DModel

from diffexit.uem import UEMStack, token_uncertainty


def random_stack(seed=0, blocks=3, d=8):
    torch.manual_seed(seed)
    uem = UEMStack(num_blocks=blocks, hidden_size=d, model_class="DiTTransformer2DModel")
    with torch.no_grad():
        for p in uem.parameters():
            p.copy_(torch.randn_like(p))
    return uem


def test_config_records_the_base_model_shape(tiny_dit):
    uem = UEMStack.for_model(tiny_dit(layers=3, head_dim=4, sample_size=4, classes=10))
    assert (uem.config.num_blocks, uem.config.hidden_size, uem.config.model_class, uem.config.target) == (
        3, 8, "DiTTransformer2DModel", "paper")
    assert uem.cond_weight.shape == (3, 9, 8) and uem.token_weight.shape == (3, 8) and uem.token_bias.shape == (3,)


def test_untrained_heads_ignore_the_conditioning(tiny_dit):
    uem = UEMStack.for_model(tiny_dit(layers=3, head_dim=4, sample_size=4, classes=10))
    h = torch.randn(3, 2, 5, 8)
    assert torch.equal(uem(h, torch.randn(2, 8)), uem(h, torch.randn(2, 8)))


def test_token_uncertainty_matches_the_formula():
    uem = random_stack()
    hidden, cond = torch.randn(3, 2, 5, 8), torch.randn(2, 8)
    weight, bias = uem.token_heads(cond)
    assert weight.shape == (3, 2, 8) and bias.shape == (3, 2)
    u_all = uem(hidden, cond)
    assert u_all.shape == (3, 2, 5)
    for block in range(3):
        for b in range(2):
            a = uem.cond_weight[block] @ torch.nn.functional.silu(cond[b])  # [D + 1]
            w = uem.token_weight[block] + a[:8]
            bb = uem.token_bias[block] + a[8]
            want = torch.sigmoid(hidden[block, b] @ w + bb)
            torch.testing.assert_close(u_all[block, b], want, rtol=1e-5, atol=1e-6)
        got = token_uncertainty(hidden[block], weight[block], bias[block])
        torch.testing.assert_close(got, u_all[block], rtol=1e-5, atol=1e-6)
    assert ((u_all >= 0) & (u_all <= 1)).all()


def test_forward_takes_a_list_of_block_states_and_checks_its_length():
    uem = random_stack()
    hidden, cond = torch.randn(3, 2, 5, 8), torch.randn(2, 8)
    assert torch.equal(uem(list(hidden), cond), uem(hidden, cond))
    with pytest.raises(ValueError, match="all 3 blocks"):
        uem(hidden[:2], cond)


def test_save_and_load_round_trip(tmp_path):
    uem = random_stack()
    uem.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "UEMStack"
    assert {k: config[k] for k in ("num_blocks", "hidden_size", "model_class", "target")} == {
        "num_blocks": 3, "hidden_size": 8, "model_class": "DiTTransformer2DModel", "target": "paper"}
    loaded = UEMStack.from_pretrained(tmp_path)
    keys = ("num_blocks", "hidden_size", "model_class", "target")
    assert {k: loaded.config[k] for k in keys} == {k: uem.config[k] for k in keys}
    for (name, p), (_, q) in zip(uem.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), name


def test_uems_for_another_shape_are_refused(tiny_dit):
    model = tiny_dit(layers=3, head_dim=4, sample_size=4, classes=10)
    UEMStack.for_model(model).check_matches(model)
    for other in (tiny_dit(layers=4, head_dim=4, sample_size=4, classes=10), tiny_dit(layers=3, heads=3, head_dim=4, sample_size=4, classes=10)):
        with pytest.raises(ValueError, match="built for a DiTTransformer2DModel"):
            UEMStack.for_model(other).check_matches(model)
    wrong_class = UEMStack(num_blocks=3, hidden_size=8, model_class="PixArtTransformer2DModel")
    with pytest.raises(ValueError, match="PixArtTransformer2DModel.*but the model is a DiTTransformer2DModel"):
        wrong_class.check_matches(model)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_blocks": 0}, "num_blocks"),
        ({"hidden_size": 2.5}, "hidden_size"),
        ({"model_class": ""}, "model_class"),
        ({"target": "oracle"}, "unknown UEM target"),
    ],
)
def test_bad_config_is_refused(kwargs, match):
    args = {"num_blocks": 2, "hidden_size": 4, "model_class": "DiTTransformer2DModel"} | kwargs
    with pytest.raises(ValueError, match=match):
        UEMStack(**args)


def test_heads_are_light():
    uem = UEMStack(num_blocks=12, hidden_size=128, model_class="DiTTransformer2DModel")
    assert sum(p.numel() for p in uem.parameters()) == 12 * (129 * 128 + 128 + 1)
