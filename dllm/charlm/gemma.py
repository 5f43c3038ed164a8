"""The embedded text tasks in DiffusionGemma's format: a small ``DiffusionGemmaForBlockDiffusion`` config over the
character tokenizer, that tokenizer with a chat template (as ``DiffusionGemmaPipeline`` encodes prompts), the span
layout in whole canvases, loading, and decoding the tasks with the model's own encoder, decoder and sampling
(``diffexit.dllm.gemma_loop``).

DiffusionGemma is an encoder-decoder over one set of weights: a causal encoder reads the prompt into a KV cache, a
bidirectional decoder denoises a canvas of ``canvas_length`` tokens that starts as uniform random tokens. Its config
always carries a vision tower (167M parameters by default); the tasks have no images, so it is shrunk to one
16-wide layer, and three token ids past the tokenizer's (``boi``, ``eoi``, ``image``) are reserved for it and never
appear in text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from transformers import DiffusionGemmaConfig, PreTrainedTokenizerFast
from transformers.models.diffusion_gemma.configuration_diffusion_gemma import DiffusionGemmaTextConfig
from transformers.models.gemma4.configuration_gemma4 import Gemma4VisionConfig

from .tasks import Layout
from .tokenizer import build_tokenizer, decode_answer, encode_prompts

GEMMA_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights-gemma"
# The shipped model's three legs (each stretches the cosine to its own end; MODEL_CARD.md), about 100 min on 2 cores.
_GEMMA_RUN = ("diffexit train text --arch diffusion-gemma --hidden 128 --layers 4 --heads 4 --lr 1e-3 "
              "--decode-every 250 --decode-n 16 --threads 1 --out runs/gemma")
GEMMA_TRAIN_COMMAND = (f"{_GEMMA_RUN} --steps 3000 && {_GEMMA_RUN} --steps 6000 --resume && {_GEMMA_RUN} --steps 8000 "
                       f"--resume --export dllm/charlm/weights-gemma --decode-eval 100")
CANVAS_LENGTH = 16  # one short answer span; the long-form span is nine
IMAGE_TOKENS = 3  # boi, eoi, image: ids len(tokenizer) .. len(tokenizer) + 2
# The prompt as the user wrote it: the tasks' prompts carry their own tag, so the template adds nothing.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def chat_tokenizer():
    """The character tokenizer (:func:`.tokenizer.build_tokenizer`) with a chat template that passes prompts through."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def gemma_config(tokenizer, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2, head_dim: int = 32,
                 num_experts: int = 2, canvas_length: int = CANVAS_LENGTH, max_positions: int = 512) -> DiffusionGemmaConfig:
    """A DiffusionGemma config for ``tokenizer``: ``num_layers`` layers of width ``hidden_size``, each with a dense MLP
    and ``num_experts`` experts (one active), one key-value head, and a one-layer vision tower.

    Gemma 4 interleaves sliding-window layers with global ones (the last layer must be global), and sizes its global
    layers for 256K-token contexts: head size 512 (``global_head_dim``), keys reused as values, and RoPE on a quarter
    of the head at theta 1e6, which barely tells nearby positions apart. The tasks' sequences are under
    ``max_positions`` tokens, so here every layer but the last is a sliding one whose window covers the whole
    sequence (full attention in effect, with its own values and full RoPE at theta 1e4), and the last layer keeps
    Gemma's global form with the per-layer head size and the sliding layers' RoPE. With the stock global layers a
    1.78M model learned no task in 1000 steps (``docs/design.md``).
    """
    if hidden_size <= 0 or num_layers <= 0 or num_heads <= 0 or head_dim <= 0 or num_experts <= 0:
        raise ValueError("hidden_size, num_layers, num_heads, head_dim and num_experts must be positive")
    vocab = len(tokenizer)
    local_rope = {"rope_type": "default", "rope_theta": 10_000.0}
    text = DiffusionGemmaTextConfig(
        vocab_size=vocab + IMAGE_TOKENS, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=1, head_dim=head_dim,
        global_head_dim=head_dim, num_experts=num_experts, top_k_experts=1, moe_intermediate_size=hidden_size,
        layer_types=["sliding_attention"] * (num_layers - 1) + ["full_attention"], sliding_window=max_positions,
        rope_parameters={"sliding_attention": local_rope, "full_attention": local_rope},
        max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    vision = Gemma4VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1,
                                num_key_value_heads=1, head_dim=16)
    return DiffusionGemmaConfig(text_config=text, vision_config=vision, boi_token_id=vocab, eoi_token_id=vocab + 1,
                                image_token_id=vocab + 2, canvas_length=canvas_length)


def new_gemma_model(config: DiffusionGemmaConfig):
    """A new ``DiffusionGemmaForBlockDiffusion`` of ``config`` to train: transformers' initialization, except that
    the query and key norms' scales start at ``head_dim ** -0.25`` instead of 1.

    Gemma does not scale its attention logits (``scaling = 1.0``); it RMS-normalizes queries and keys instead. With
    both scales at 1, a ``head_dim``-wide head starts with logits of standard deviation ``sqrt(head_dim)`` (5.7 at 32):
    nearly one-hot attention to random positions. Starting them at ``head_dim ** -0.25`` gives the usual
    ``1 / sqrt(head_dim)`` attention at the start, and training moves them from there. On the embedded tasks a 1.41M
    model with the default scales learned the controls but in 1500 steps never used the canvas to make a choice; with
    these, the same run decoded every task (docs/design.md).
    """
    from transformers import DiffusionGemmaForBlockDiffusion

    model = DiffusionGemmaForBlockDiffusion(config)
    with torch.no_grad():
        for layers in (model.model.encoder.language_model.layers, model.model.decoder.layers):
            for layer in layers:
                for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                    norm.weight.fill_(norm.weight.shape[0] ** -0.25)
    return model


def gemma_span(layout: Layout, canvas_length: int) -> int:
    """The answer span in whole canvases: ``layout.span_length`` rounded up to a multiple of ``canvas_length``."""
    return -(-layout.span_length // canvas_length) * canvas_length


def load_gemma_model(path, *, dtype: torch.dtype = torch.float32):
    """An exported DiffusionGemma folder (``diffexit train text --arch diffusion-gemma --export``): ``(model,
    tokenizer)``, the model in eval mode."""
    from transformers import DiffusionGemmaForBlockDiffusion

    path = Path(path)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=dtype).eval()
    return model, PreTrainedTokenizerFast.from_pretrained(path)


def load_embedded_gemma_model(*, dtype: torch.dtype = torch.float32):
    """The shipped DiffusionGemma model (``dllm/charlm/weights-gemma``), offline, in eval mode."""
    if not (GEMMA_WEIGHTS_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"no embedded DiffusionGemma model in {GEMMA_WEIGHTS_DIR}; train and export it with "
                                f"`{GEMMA_TRAIN_COMMAND}` from the repository root, or pass --model DIR")
    return load_gemma_model(GEMMA_WEIGHTS_DIR, dtype=dtype)


@torch.no_grad()
def gemma_decode(model, tokenizer, prompts: Sequence[str], layout: Layout, steps: int, *, seed: int = 0,
                 stopping=None, streamer=None, **generate_kwargs) -> tuple[list[str], torch.Tensor]:
    """Decode ``prompts`` with the model's own encoder and decoder calls and sampling, a stopped sample out of the
    batch (``diffexit.dllm.gemma_loop.decode``): ``(answers, decoder passes per sample [B])``.

    ``steps`` is ``max_denoising_steps`` per canvas. With no ``stopping`` rule, no stock thresholds in
    ``generate_kwargs`` and none enabled on the model (``diffexit.dllm.diffusion_gemma.enable_sched``), every step
    runs. Sample ``j`` draws its noise from its own generator seeded ``seed + j`` (each canvas from that and its
    index), so an answer depends on neither its batch nor an early stop of an earlier canvas.
    """
    from ..gemma_loop import decode

    canvas_length = model.config.canvas_length
    ids, mask = encode_prompts(tokenizer, list(prompts), layout.prompt_length)
    device = next(model.parameters()).device
    stock = {"stability_threshold", "confidence_threshold"} & set(generate_kwargs)
    if stopping is None and not stock and getattr(model, "_diffexit_stopping", None) is None:
        generate_kwargs = {**generate_kwargs, "confidence_threshold": None}
    out = decode(model, ids.to(device), attention_mask=mask.to(device), stopping=stopping,
                 seeds=[seed + j for j in range(len(ids))], streamer=streamer,
                 max_new_tokens=gemma_span(layout, canvas_length), max_denoising_steps=steps, **generate_kwargs)
    answers = [decode_answer(tokenizer, row) for row in out.sequences[:, layout.prompt_length:].cpu()]
    return answers, out.passes.cpu()


def gemma_decode_table(model, tokenizer, n: int, tasks: Optional[Sequence[str]] = None, seed: int = 0) -> dict:
    """``{task: {"full": accuracy, "one_step": accuracy}}`` on ``n`` held-out examples of each task: every one of
    ``canvas_length`` denoising steps per canvas (one token's worth each), and one step per canvas."""
    from .tasks import TASK_NAMES, layout_of, sample, score

    was_training = model.training
    model.eval()
    out = {}
    for task in tasks or TASK_NAMES:
        examples = sample(task, "heldout", seed, n)
        row = {}
        for key, steps in (("full", model.config.canvas_length), ("one_step", 1)):
            answers, _ = gemma_decode(model, tokenizer, [e.prompt for e in examples], layout_of(task), steps)
            row[key] = sum(score(task, e.prompt, a) for e, a in zip(examples, answers)) / n
        out[task] = row
    model.train(was_training)
    return out
