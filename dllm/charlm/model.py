"""The embedded masked-diffusion text model: a bidirectional transformers Llama with learned absolute positions.

``DiffusionLlama`` is ``LlamaForCausalLM`` with ``config.is_causal = False`` (every position attends to every
other, which transformers turns into a bidirectional mask) plus a learned absolute position embedding added
to the token embeddings. RoPE alone gives a bidirectional model only relative positions, and then it cannot
reverse or add (docs/design.md, "What a first CPU experiment measured (text)").

It takes what diffusers' ``LLaDA2Pipeline`` and ``diffexit.dllm.generate`` pass: ``input_ids`` ``[B, N]``, a 2-D
``attention_mask`` (0 = not attended) and ``position_ids`` (default ``arange(N)``), and returns ``.logits``
``[B, N, V]``. ``[PAD]`` tokens are never attended, whatever mask the caller passes, because prompts are
left-padded with them and the model was trained that way. It also takes a transformers ``cache`` (``use_cache``),
so :func:`diffexit.dllm.generate`'s KV caches work with it.

Block-causal attention (``config.block_length`` set, see :func:`text_model_config`): the prompt, the first
``config.prompt_length`` positions, is block 0, bidirectional within itself; after it, position ``p`` is in block
``1 + (p - prompt_length) // block_length``. A position attends to the blocks up to its own and never to a later
one, so the keys and values of the prompt and of every finished block never change once written: a KV cache of
them is exact. With ``block_length`` None (the default) attention is bidirectional, as before.

``load_embedded_text_model()`` loads the shipped weights from the package's ``dllm/charlm/weights/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from .tasks import PROMPT_LENGTH

# diffusers loads a custom pipeline component by looking its base class up in the component's module: with
# PreTrainedModel importable here, MaskedDiffusionPipeline.from_pretrained can load a DiffusionLlama.
__all__ = ["DiffusionLlama", "PreTrainedModel", "text_model_config", "load_text_model", "load_embedded_text_model"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TRAIN_COMMAND = "diffexit train text --threads 1 --out runs/text --export dllm/charlm/weights"
# charlm-block: the shipped model converted to block-causal attention (MODEL_CARD.md there has the command).
BLOCK_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights-block"


def text_model_config(
    vocab_size: int, pad_token_id: int, *, hidden_size: int, num_layers: int, num_heads: int, max_positions: int,
    block_length: Optional[int] = None, prompt_length: int = PROMPT_LENGTH,
) -> LlamaConfig:
    """A non-causal Llama config: SwiGLU width ``4 * hidden_size``, no KV cache, untied output head.

    ``block_length`` None: bidirectional attention. An int: block-causal attention over blocks of that many span
    positions after a ``prompt_length``-position prompt block (the module docstring).
    """
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be a multiple of num_heads={num_heads}")
    if block_length is not None and (isinstance(block_length, bool) or not isinstance(block_length, int)
                                     or block_length <= 0):
        raise ValueError(f"block_length must be None (bidirectional) or a positive int, got {block_length!r}")
    if block_length is not None and (not isinstance(prompt_length, int) or not 0 < prompt_length < max_positions):
        raise ValueError(f"prompt_length must be an int in (0, max_positions={max_positions}), got {prompt_length!r}")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        eos_token_id=None,
        is_causal=False,
        use_cache=False,
        tie_word_embeddings=False,
        block_length=block_length,
        prompt_length=prompt_length,
    )


class DiffusionLlama(LlamaForCausalLM):
    """``LlamaForCausalLM`` made bidirectional, with a learned absolute position embedding.

    The embedding table has ``config.max_position_embeddings`` rows; position ids must stay below that.
    ``prompt_length``: the left-padded prompt width of every layout it is trained on (``.tasks.PROMPT_LENGTH``),
    which ``MaskedDiffusionPipeline`` pads to when it is not told otherwise.
    """

    prompt_length = PROMPT_LENGTH

    def __init__(self, config: LlamaConfig):
        if getattr(config, "is_causal", True):
            raise ValueError("DiffusionLlama is a bidirectional masked-diffusion model; build its config with "
                             "is_causal=False (see text_model_config)")
        super().__init__(config)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.post_init()

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache=None,
        use_cache: bool = False,
        **kwargs,
    ):
        """``input_ids`` int64 ``[B, N]`` -> output with ``.logits`` float ``[B, N, V]`` (and ``.cache``).

        ``attention_mask`` is 2-D (0 = not attended): ``[B, N]``, or with a ``cache`` holding ``C`` positions,
        ``[B, C + N]`` over the cached keys and then the new tokens. ``position_ids`` ``[B, N]`` or ``[1, N]``;
        with a cache they must be given (the new tokens' places in the sequence). ``use_cache=True`` returns the
        keys and values of every layer in ``.cache``, which the KV-cached decoding loop
        (:mod:`diffexit.dllm.kv_cache`) reuses. A 4-D boolean ``attention_mask`` ``[B, 1, N, K]`` (True =
        attended) is used as it is: no padding or block rule is added to it.
        """
        if input_ids is None:
            raise ValueError("DiffusionLlama needs input_ids: the position embedding is added to token embeddings")
        length = input_ids.shape[1]
        if position_ids is None:
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("with a cache, pass position_ids: the new tokens' places in the sequence")
            position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0)
        if int(position_ids.max()) >= self.config.max_position_embeddings:
            raise ValueError(f"position id {int(position_ids.max())} is beyond the model's "
                             f"{self.config.max_position_embeddings} positions; use a shorter prompt or span")
        not_pad = input_ids != self.config.pad_token_id
        if attention_mask is not None and attention_mask.dim() == 4:
            pass  # prepared by the caller (the block-causal training objective): used as is
        elif attention_mask is None:
            attention_mask = not_pad
        else:
            # The trailing columns are the new tokens; cached keys keep the mask the caller gave them.
            attention_mask = attention_mask.bool().clone()
            attention_mask[:, -length:] &= not_pad
        embeds = self.model.embed_tokens(input_ids) + self.position_embedding(position_ids)
        if getattr(self.config, "block_length", None) is not None and attention_mask.dim() == 2:
            attention_mask = self.block_causal_mask(position_ids.expand(input_ids.shape[0], -1), attention_mask,
                                                    cache.get_seq_length() if cache is not None else 0)
        return super().forward(
            inputs_embeds=embeds, attention_mask=attention_mask if attention_mask.dim() == 4 else attention_mask.long(),
            position_ids=position_ids, cache=cache,
            use_cache=use_cache, **kwargs,
        )

    def block_of(self, positions: torch.Tensor) -> torch.Tensor:
        """The attention block of each sequence position (int64, same shape): 0 for the prompt, then 1, 2, ..."""
        prompt = self.config.prompt_length
        return torch.where(positions < prompt, 0, 1 + (positions - prompt).div(self.config.block_length,
                                                                                  rounding_mode="floor"))

    def block_causal_mask(self, position_ids: torch.Tensor, attention_mask: torch.Tensor, cached: int) -> torch.Tensor:
        """The boolean ``[B, 1, N, C + N]`` mask (True = attended) of ``N`` new tokens at ``position_ids`` ``[B, N]``
        over ``C = cached`` cached keys (positions ``0..C-1``, what the exact prefix cache keeps) and themselves:
        a key is attended when its block is not after the query's and ``attention_mask`` ``[B, C + N]`` keeps it."""
        batch, length = position_ids.shape
        if attention_mask.shape != (batch, cached + length):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; with {cached} cached keys and "
                             f"{length} new tokens it must be [{batch}, {cached + length}]")
        past = torch.arange(cached, device=position_ids.device).expand(batch, -1)
        key_blocks = self.block_of(torch.cat([past, position_ids], dim=1))
        allowed = key_blocks[:, None, :] <= self.block_of(position_ids)[:, :, None]
        return (allowed & attention_mask[:, None, :].bool())[:, None]


def load_text_model(path: str | Path, *, dtype: torch.dtype = torch.float32) -> tuple[DiffusionLlama, PreTrainedTokenizerFast]:
    """Load an exported model directory (``model.safetensors``, ``config.json``, ``tokenizer.json``) in eval mode."""
    path = Path(path)
    model = DiffusionLlama.from_pretrained(path, dtype=dtype).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    if tokenizer.mask_token_id is None:
        raise ValueError(f"tokenizer in {path} has no mask token; re-export it with `{TRAIN_COMMAND}`")
    return model, tokenizer


def load_embedded_text_model(*, dtype: torch.dtype = torch.float32) -> tuple[DiffusionLlama, PreTrainedTokenizerFast]:
    """The shipped model and tokenizer from ``diffexit/dllm/charlm/weights``, offline, in eval mode (fp32 by default)."""
    if not (WEIGHTS_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"no embedded text model in {WEIGHTS_DIR}; train and export it with `{TRAIN_COMMAND}` "
                                f"from the repository root")
    return load_text_model(WEIGHTS_DIR, dtype=dtype)


def load_embedded_block_model(*, dtype: torch.dtype = torch.float32) -> tuple[DiffusionLlama, PreTrainedTokenizerFast]:
    """The shipped block-causal model (``charlm-block``, blocks of 4) and its tokenizer, offline, in eval mode."""
    if not (BLOCK_WEIGHTS_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"no embedded block-causal model in {BLOCK_WEIGHTS_DIR}; convert and export it with "
                                f"the command in the repository's README (diffexit train text --block-length 4 "
                                f"--init-from charlm ... --export dllm/charlm/weights-block)")
    return load_text_model(BLOCK_WEIGHTS_DIR, dtype=dtype)
