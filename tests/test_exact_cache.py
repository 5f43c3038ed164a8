"""The exact prefix cache (diffexit.dllm.exact_cache) when the span holds a padding token: the embedded model never
attends a padding token it is given, so a cached one must stay unattended too."""

import torch

from diffexit.dllm import SchED, generate
from diffexit.dllm.charlm.model import DiffusionLlama, text_model_config
from diffexit.dllm.charlm.tokenizer import build_tokenizer, encode_prompts
from diffexit.dllm.exact_cache import ExactPrefixCache
from diffexit.samplers import ThresholdSchedule

PROMPT, BLOCK, SPAN = 8, 4, 12


def _model(tok, seed=0):
    torch.manual_seed(seed)
    cfg = text_model_config(len(tok), tok.pad_token_id, hidden_size=32, num_layers=2, num_heads=4, max_positions=32,
                            block_length=BLOCK, prompt_length=PROMPT)
    return DiffusionLlama(cfg).eval()


def test_a_padding_token_in_a_cached_block_gives_the_logits_of_no_cache():
    tok = build_tokenizer()
    model = _model(tok)
    ids, mask = encode_prompts(tok, ["rev:ab", "add:1+2"], PROMPT)
    full_mask = torch.cat([mask, torch.ones(2, SPAN, dtype=torch.long)], 1)
    x = torch.cat([ids, torch.full((2, SPAN), tok.mask_token_id)], 1)
    x[:, PROMPT:PROMPT + BLOCK] = torch.tensor([[40, tok.pad_token_id, 41, 42], [43, 44, 45, 46]])
    x[:, PROMPT + BLOCK] = 47  # one committed token in block 1, so its later step differs from its first
    cache = ExactPrefixCache(model, PROMPT, BLOCK, full_mask)
    rows = torch.arange(2)
    with torch.no_grad():
        cache.step(x, rows, 0, True)  # writes the prompt
        first = cache.step(x, rows, 1, True)  # writes block 0, padding token included
        later = cache.step(x, rows, 1, False)  # reads block 0 from the cache
        want = model(x, attention_mask=full_mask).logits[:, PROMPT + BLOCK:PROMPT + 2 * BLOCK]
    torch.testing.assert_close(first, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(later, want, atol=1e-5, rtol=1e-5)


def test_decoding_that_commits_padding_is_the_same_with_the_cache():
    # A model that leans to the padding token in the span: every step, cached and not, token for token, and the
    # block statistic a rule that never halts is shown (per block: the current block's min margin) is the same.
    tok = build_tokenizer()
    model = _model(tok, seed=1)
    model.lm_head.weight.data *= 20
    model.lm_head.weight.data[tok.pad_token_id] *= 2
    ids, mask = encode_prompts(tok, ["rev:ab", "rev:abc", "add:1+2", "p:a", "x", "q:zz"], PROMPT)
    kw = dict(attention_mask=mask, gen_length=SPAN, steps=SPAN, block_length=BLOCK, mask_id=tok.mask_token_id,
              return_trace=True)
    never = lambda: SchED(ThresholdSchedule("constant", 1e9, 1e9), stat="min")
    plain, cached = generate(model, ids, halting=never(), **kw), generate(model, ids, halting=never(), cache="prefix",
                                                                          **kw)
    # Padding committed before the last block, where the cache keeps it.
    assert (plain.generated[:, :SPAN - BLOCK] == tok.pad_token_id).any()
    assert torch.equal(plain.sequences, cached.sequences)
    for a, b in zip(plain.trace, cached.trace):
        torch.testing.assert_close(torch.tensor([s.margin for s in a]), torch.tensor([s.margin for s in b]),
                                   atol=1e-4, rtol=1e-4)
