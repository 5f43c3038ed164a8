"""The digits DiT: a diffusers ``DiTTransformer2DModel`` in pixel space, built the way the embedded one was trained.

16x16x1 digits, patch 2 (64 tokens), 12 blocks of 4 heads x 32 by default, class-conditional over the 10 digits
with label 1000 (``num_embeds_ada_norm``) as the null class for classifier-free guidance, as ``DiTPipeline``
expects. The noise schedule is DDPM's cosine (``squaredcos_cap_v2``) of 1000 steps; the linear schedule leaves
16x16 images almost pure noise (SNR below 0.03) for the last 40% of its steps.

Two departures from a stock ``DiTTransformer2DModel``, both fixed at construction (:func:`build_transformer`):

- **adaLN-Zero initialisation**, as in the DiT paper: every block's modulation and the output layers start
  at zero, so each block starts as the identity. diffusers leaves PyTorch's default init.
- **One label dropout per sample.** diffusers gives every block (and the output layer) its own
  ``LabelEmbedding`` that drops labels independently in train mode, so a sample is almost never
  unconditional in all 13 places at once, and the null class that guidance relies on is barely trained.
  The per-module dropout is switched off (:func:`disable_label_dropout`) and trainers drop labels themselves.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .data import NUM_CLASSES

NULL_CLASS = 1000
PATCH_SIZE = 2
# Noise schedule shared by training (DDPM) and the shipped sampler (DDIM).
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=True)


def build_transformer(image_size: int = 16, num_layers: int = 12, num_heads: int = 4, head_dim: int = 32):
    """A fresh class-conditional pixel-space ``DiTTransformer2DModel`` (1 channel in and out, patch 2),
    adaLN-Zero initialised, with the per-block label dropout off (see the module docstring).

    Rows 10..999 of each label table are never used (digits are 0..9, the null class is 1000); they start
    at zero and stay there, which costs nothing and keeps the shipped file compressible.
    """
    from diffusers import DiTTransformer2DModel
    from diffusers.models.embeddings import LabelEmbedding

    from ..block_adapters import blocks

    if image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a multiple of the patch size {PATCH_SIZE}, got {image_size}")
    model = DiTTransformer2DModel(
        num_attention_heads=num_heads,
        attention_head_dim=head_dim,
        in_channels=1,
        out_channels=1,
        num_layers=num_layers,
        sample_size=image_size,
        patch_size=PATCH_SIZE,
        num_embeds_ada_norm=NULL_CLASS,
        norm_type="ada_norm_zero",
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, LabelEmbedding):
                table = module.embedding_table.weight
                nn.init.normal_(table, std=0.02)
                table[NUM_CLASSES:NULL_CLASS].zero_()
        patch = model.pos_embed.proj.weight
        nn.init.xavier_uniform_(patch.view(patch.shape[0], -1))
        nn.init.zeros_(model.pos_embed.proj.bias)
        for block in blocks(model):
            embed = block.norm1.emb.timestep_embedder
            nn.init.normal_(embed.linear_1.weight, std=0.02)
            nn.init.normal_(embed.linear_2.weight, std=0.02)
            nn.init.zeros_(block.norm1.linear.weight)
            nn.init.zeros_(block.norm1.linear.bias)
        for layer in (model.proj_out_1, model.proj_out_2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
    return disable_label_dropout(model)


def disable_label_dropout(model):
    """Switch off the label dropout inside every ``LabelEmbedding`` of a DiT (returns the model).

    ``from_pretrained`` builds them with dropout 0.1 again (it is not part of the config), and in train mode
    each block would then drop labels on its own; anything that trains this backbone further should call
    this first and drop labels itself, as :func:`epsilon_loss` does.
    """
    from diffusers.models.embeddings import LabelEmbedding

    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return model


def build_noise_scheduler():
    """The training noise schedule: diffusers ``DDPMScheduler`` with :data:`SCHEDULE`."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE)


def build_sampling_scheduler():
    """The shipped sampler: DDIM on the training schedule, with "trailing" spacing so that the first step
    starts at t = 999, where the noise the pipeline draws actually belongs."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULE, timestep_spacing="trailing")
