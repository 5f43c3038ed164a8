"""The adapter contract: ``blocks``, ``num_blocks`` and ``hidden_size`` answer for every supported transformer, and
nothing outside ``uem/block_adapters.py`` reads a transformer's layout."""

import re
from pathlib import Path

import pytest
import torch

from diffexit.uem.block_adapters import SUPPORTED, blocks, hidden_size, num_blocks, supported_class

ROOT = Path(__file__).resolve().parent.parent


def _pixart(layers):
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=layers, sample_size=8,
        patch_size=2, cross_attention_dim=16, caption_channels=12, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, use_additional_conditions=False, norm_elementwise_affine=False, norm_eps=1e-6)


def _sd3(layers):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
        pos_embed_max_size=16)


@pytest.mark.parametrize("build", ["dit", "pixart", "sd3"])
def test_every_supported_model_answers_its_layout(build, tiny_dit):
    torch.manual_seed(0)
    model = {"dit": lambda: tiny_dit(layers=3), "pixart": lambda: _pixart(3), "sd3": lambda: _sd3(3)}[build]()
    stack = blocks(model)
    assert isinstance(stack, torch.nn.ModuleList) and stack is model.transformer_blocks
    assert num_blocks(model) == 3
    assert hidden_size(model) == 16  # 2 heads x 8
    assert type(model).__name__ in SUPPORTED and supported_class(type(model).__name__) is type(model)


def test_the_embedded_digits_dit_answers_its_layout():
    from diffexit.uem.digits.embedded import load_embedded_pipeline

    model = load_embedded_pipeline().transformer
    assert num_blocks(model) == len(blocks(model)) == model.config.num_layers
    assert hidden_size(model) == model.config.num_attention_heads * model.config.attention_head_dim


def test_an_unsupported_model_is_refused_naming_its_class_and_the_supported_ones():
    model = torch.nn.Linear(2, 2)
    for ask in (blocks, num_blocks, hidden_size):
        with pytest.raises(ValueError, match=r"support DiTTransformer2DModel, PixArtTransformer2DModel, "
                                             r"SD3Transformer2DModel, FluxTransformer2DModel, SanaTransformer2DModel; got Linear"):
            ask(model)
    with pytest.raises(ValueError, match="got AuraFlowTransformer2DModel"):
        supported_class("AuraFlowTransformer2DModel")


def test_nothing_outside_the_adapters_reads_a_transformers_layout():
    readers = []
    for folder in ("uem", "app", "samplers", "common", "dllm", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "uem" / "block_adapters.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\.(transformer_blocks|inner_dim)\b", line):
                    readers.append(f"{path.relative_to(ROOT)}:{number}")
    assert not readers, "layout read outside uem/block_adapters.py: " + ", ".join(readers)
