"""Early exits in FluxPipeline and SanaPipeline, end to end, on tiny random components built offline.

The text encoders are tiny random CLIP + T5 (Flux) and Gemma2 (Sana); their tokenizers are word-level vocabularies
built with ``tokenizers``, so nothing is downloaded. The pipelines are called exactly as without exits.
"""

import numpy as np
import pytest
import torch

from diffexit.samplers import ExitAwareScheduler
from diffexit.samplers.early_exits import attach_early_exits, detach_early_exits
from diffexit.uem import UEMStack, enable_early_exit
from diffexit.uem.exit_config import EarlyExitConfig

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue"]
STEPS = 3


def word_tokenizer(max_length):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>", "<bos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   bos_token="<bos>", model_max_length=max_length)


def flux_pipe():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    vocab = len(WORDS) + 4
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=8, projection_dim=16,
                                        eos_token_id=2, pad_token_id=0, bos_token_id=3))
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
                                 decoder_start_token_id=0))
    vae = AutoencoderKL(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.06, scaling_factor=1.5)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=clip.eval(),
                        tokenizer=word_tokenizer(8), text_encoder_2=t5.eval(), tokenizer_2=word_tokenizer(8),
                        transformer=transformer.eval())


def sana_pipe():
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=3,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=16, patch_size=2)
    gemma = Gemma2Model(Gemma2Config(vocab_size=len(WORDS) + 4, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                     max_position_embeddings=32, pad_token_id=0))
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "ResBlock"), decoder_block_types=("ResBlock", "ResBlock"),
                        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                        encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()),
                        downsample_block_type="conv", upsample_block_type="interpolate", scaling_factor=0.41)
    return SanaPipeline(tokenizer=word_tokenizer(32), text_encoder=gemma.eval(), vae=vae.eval(),
                        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def run_flux(pipe):
    return pipe(["a photo of a cat", "a red dog"], height=16, width=16, num_inference_steps=STEPS,
                guidance_scale=3.5, max_sequence_length=8, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def run_sana(pipe):
    # Classifier-free guidance: the pipeline stacks [uncond; cond] halves of the same latents, one pair per prompt.
    # Sana's pipeline takes sizes in multiples of 32.
    return pipe(["a photo of a cat", "a red dog"], height=32, width=32, num_inference_steps=STEPS,
                guidance_scale=4.5, max_sequence_length=8, complex_human_instruction=None,
                use_resolution_binning=False, generator=torch.Generator().manual_seed(0), output_type="np").images


PIPES = {"flux": (flux_pipe, run_flux, 4), "sana": (sana_pipe, run_sana, 3)}


@torch.no_grad()
@pytest.mark.parametrize("name", PIPES)
def test_the_pipeline_with_exits_runs_end_to_end(name):
    make, run, depth = PIPES[name]
    pipe = make()
    stock = run(pipe)
    assert stock.shape[0] == 2 and stock.shape[-1] == 3 and np.isfinite(stock).all()

    attach_early_exits(pipe, EarlyExitConfig("full"), steps=STEPS)
    full = run(pipe)
    assert np.array_equal(full, stock)
    assert pipe.scheduler.statistics.depths.tolist() == [[depth, depth]] * STEPS  # two samples, guided or not
    detach_early_exits(pipe)

    # One stretch per step: the noisiest step runs one block, the next two, the last every block.
    attached = attach_early_exits(pipe, EarlyExitConfig("static", depths=(1, 2, depth)), steps=STEPS)
    shallow = run(pipe)
    stats = pipe.scheduler.statistics
    assert stats.depths.tolist() == [[1, 1], [2, 2], [depth, depth]]
    assert stats.layer_ratio == pytest.approx((1 + 2 + depth) / (3 * depth))
    assert shallow.shape == stock.shape and np.isfinite(shallow).all() and not np.array_equal(shallow, stock)
    assert attached.early_exit.last_depths.tolist() == [depth, depth]
    detach_early_exits(pipe)
    assert np.array_equal(run(pipe), stock)

    # Exits with a cached remainder: refreshed at every step it is full depth; refreshed at the first step only,
    # the later steps run one block and add the skipped blocks' cached residuals.
    attach_early_exits(pipe, EarlyExitConfig("static", depths=(1,), remainder="cached", refresh_every=1), steps=STEPS)
    assert np.array_equal(run(pipe), stock)
    detach_early_exits(pipe)
    attach_early_exits(pipe, EarlyExitConfig("static", depths=(1,), remainder="taylor"), steps=STEPS)
    cached = run(pipe)
    assert pipe.scheduler.statistics.depths.tolist() == [[depth, depth], [1, 1], [1, 1]]
    assert np.isfinite(cached).all() and not np.array_equal(cached, stock)
    detach_early_exits(pipe)

    # The training-free similarity exit: a tolerance below every block's change runs every block through the
    # adapter (the exact stock images); one above every change stops all samples after block 1, as depth 1 does.
    attach_early_exits(pipe, EarlyExitConfig("similarity", tolerance=1e-6), steps=STEPS)
    assert np.array_equal(run(pipe), stock)
    assert pipe.scheduler.statistics.depths.tolist() == [[depth, depth]] * STEPS
    detach_early_exits(pipe)
    attach_early_exits(pipe, EarlyExitConfig("similarity", tolerance=1.0), steps=STEPS)
    settled = run(pipe)
    assert pipe.scheduler.statistics.depths.tolist() == [[1, 1]] * STEPS
    detach_early_exits(pipe)
    attach_early_exits(pipe, EarlyExitConfig("static", depths=(1,)), steps=STEPS)
    assert np.array_equal(run(pipe), settled)
    detach_early_exits(pipe)


@torch.no_grad()
@pytest.mark.parametrize("name", PIPES)
def test_uem_heads_exit_in_the_pipeline(name):
    make, run, depth = PIPES[name]
    pipe = make()
    torch.manual_seed(1)
    uem = UEMStack.for_model(pipe.transformer)
    with torch.no_grad():
        uem.token_weight.zero_()
        uem.token_bias.fill_(-4.0)  # uncertainty sigmoid(-4) ~ 0.018 at every block: every sample exits at once
    early = enable_early_exit(pipe, uem, 0.05)
    pipe.scheduler = ExitAwareScheduler(pipe.scheduler, early)
    images = run(pipe)
    assert np.isfinite(images).all()
    assert pipe.scheduler.statistics.depths.tolist() == [[1, 1]] * STEPS
    early.rule = 0.01  # below every uncertainty: no exit fires
    run(pipe)
    assert pipe.scheduler.statistics.depths.tolist() == [[depth, depth]] * STEPS
