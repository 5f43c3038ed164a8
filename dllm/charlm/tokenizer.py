"""The embedded text model's character-level tokenizer, and the fixed prompt/span layout it encodes to.

One token per printable ASCII character (space included), plus four special tokens: ``[PAD]`` (left padding
of prompts, never attended), ``[EOS]`` (fills the span after the answer, as in LLaDA), ``[MASK]`` (a position
still to be decoded) and ``[UNK]`` (any other character). It is built with ``tokenizers`` and used as a
``transformers.PreTrainedTokenizerFast``, so ``save_pretrained`` writes ``tokenizer.json`` and
``from_pretrained`` (or ``AutoTokenizer``) loads it back with ``mask_token_id`` set.

A sequence is ``prompt_length`` prompt positions, left-padded with ``[PAD]`` so the answer always starts at the
same position, then ``span_length`` answer positions: the answer, then ``[EOS]`` up to the end.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, MASK, UNK = "[PAD]", "[EOS]", "[MASK]", "[UNK]"
SPECIAL_TOKENS = (PAD, EOS, MASK, UNK)
CHARACTERS = tuple(chr(c) for c in range(32, 127))


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer: ids 0-3 are ``[PAD] [EOS] [MASK] [UNK]``, then printable ASCII in order."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own piece (spaces too); Fuse joins pieces back without inserting spaces.
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, mask_token=MASK, unk_token=UNK, padding_side="left",
    )


def _char_ids(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def encode_prompts(
    tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str], prompt_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad ``prompts`` to ``prompt_length`` tokens.

    Returns ``(input_ids, attention_mask)``, both int64 ``[len(prompts), prompt_length]``; the mask is 0 on padding.
    """
    ids = _char_ids(tokenizer, prompts)
    unknown = sorted({c for p in prompts for c in p if c not in CHARACTERS})
    if unknown:
        # Decoding goes on (an [UNK] is a token like any other), but the answer is then about a different prompt.
        warnings.warn(f"the prompts hold characters outside the model's printable-ASCII vocabulary "
                      f"({''.join(unknown)!r}); each is read as [UNK]", stacklevel=2)
    too_long = [(p, len(i)) for p, i in zip(prompts, ids) if len(i) > prompt_length]
    if too_long:
        prompt, n = too_long[0]
        raise ValueError(f"prompt {prompt!r} is {n} tokens, longer than prompt_length={prompt_length}; shorten it "
                         f"or use a layout with a longer prompt")
    input_ids = torch.full((len(ids), prompt_length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), prompt_length), dtype=torch.long)
    for row, seq in enumerate(ids):
        if seq:
            input_ids[row, prompt_length - len(seq):] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, prompt_length - len(seq):] = 1
    return input_ids, attention_mask


def encode_answers(tokenizer: PreTrainedTokenizerFast, answers: Sequence[str], span_length: int) -> torch.Tensor:
    """Each answer followed by ``[EOS]`` up to ``span_length`` tokens: int64 ``[len(answers), span_length]``.

    An answer must leave room for at least one ``[EOS]``, so that the model learns where answers end.
    """
    ids = _char_ids(tokenizer, answers)
    too_long = [a for a, i in zip(answers, ids) if len(i) >= span_length]
    if too_long:
        raise ValueError(f"answer {too_long[0]!r} does not fit a span of {span_length} tokens with an [EOS] after it; "
                         f"use a longer span_length")
    span = torch.full((len(ids), span_length), tokenizer.eos_token_id, dtype=torch.long)
    for row, seq in enumerate(ids):
        if seq:
            span[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return span


def decode_answer(tokenizer: PreTrainedTokenizerFast, span_ids: Sequence[int] | torch.Tensor) -> str:
    """The text of one decoded span up to its first ``[EOS]``.

    Special tokens before it stay visible (a leftover ``[MASK]`` reads as ``"[MASK]"``), so a scorer never
    mistakes an unfinished answer for a valid one.
    """
    ids = [int(i) for i in span_ids]
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=False)
