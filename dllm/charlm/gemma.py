"""The embedded text tasks in DiffusionGemma's format: a small ``DiffusionGemmaForBlockDiffusion`` config over the
character tokenizer, and that tokenizer with a chat template, as ``DiffusionGemmaPipeline`` encodes prompts.

DiffusionGemma is an encoder-decoder over one set of weights: a causal encoder reads the prompt into a KV cache, a
bidirectional decoder denoises a canvas of ``canvas_length`` tokens that starts as uniform random tokens. Its config
always carries a vision tower (167M parameters by default); the tasks have no images, so it is shrunk to one
16-wide layer, and three token ids past the tokenizer's (``boi``, ``eoi``, ``image``) are reserved for it and never
appear in text.
"""

from __future__ import annotations

from transformers import DiffusionGemmaConfig
from transformers.models.diffusion_gemma.configuration_diffusion_gemma import DiffusionGemmaTextConfig
from transformers.models.gemma4.configuration_gemma4 import Gemma4VisionConfig

from .tokenizer import build_tokenizer

IMAGE_TOKENS = 3  # boi, eoi, image: ids len(tokenizer) .. len(tokenizer) + 2
# The prompt as the user wrote it: the tasks' prompts carry their own tag, so the template adds nothing.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def chat_tokenizer():
    """The character tokenizer (:func:`.tokenizer.build_tokenizer`) with a chat template that passes prompts through."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def gemma_config(tokenizer, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2, head_dim: int = 32,
                 num_experts: int = 2, canvas_length: int = 16, max_positions: int = 512) -> DiffusionGemmaConfig:
    """A DiffusionGemma config for ``tokenizer``: ``num_layers`` full-attention layers of width ``hidden_size``, each
    with a dense MLP and ``num_experts`` experts (one active), one key-value head, and a one-layer vision tower."""
    if hidden_size <= 0 or num_layers <= 0 or num_heads <= 0 or head_dim <= 0 or num_experts <= 0:
        raise ValueError("hidden_size, num_layers, num_heads, head_dim and num_experts must be positive")
    vocab = len(tokenizer)
    text = DiffusionGemmaTextConfig(
        vocab_size=vocab + IMAGE_TOKENS, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=1, head_dim=head_dim,
        num_experts=num_experts, top_k_experts=1, moe_intermediate_size=hidden_size,
        layer_types=["full_attention"] * num_layers, sliding_window=max_positions,
        max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    vision = Gemma4VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1,
                                num_key_value_heads=1, head_dim=16)
    return DiffusionGemmaConfig(text_config=text, vision_config=vision, boi_token_id=vocab, eoi_token_id=vocab + 1,
                                image_token_id=vocab + 2, canvas_length=canvas_length)
