"""LLaDA's Monte-Carlo log-likelihood estimator (diffexit.dllm.likelihood) against exact computations on a tiny
model: a one-token continuation, where it is exact, and the expectation over every mask of a 3-token one."""

import itertools
import math

import pytest
import torch

from diffexit.dllm.charlm.model import DiffusionLlama, text_model_config
from diffexit.dllm.generate import generate
from diffexit.dllm.likelihood import greedy_matches, loglikelihood, mask_counts


@pytest.fixture(scope="module")
def model_and_tok(tiny_text_model):
    # A large initialisation, so a token's log-probability moves with which other tokens are masked.
    return tiny_text_model(initializer_range=0.5, seed=3)


def logp(model, seq, position, token):
    """log p(token at position | seq), from one plain forward pass."""
    with torch.no_grad():
        return float(model(seq[None]).logits[0, position].float().log_softmax(-1)[token])


def test_a_one_token_continuation_is_scored_exactly(model_and_tok):
    model, tok = model_and_tok
    prompt = torch.tensor(tok("rev:abc", add_special_tokens=False)["input_ids"])
    token = torch.tensor([tok.convert_tokens_to_ids("c")])
    want = logp(model, torch.cat([prompt, torch.tensor([tok.mask_token_id])]), len(prompt), int(token))
    got = loglikelihood(model, prompt, token, mask_id=tok.mask_token_id, mc_num=8, batch_size=4,
                        generator=torch.Generator().manual_seed(0))
    assert got == pytest.approx(want, abs=1e-5)


def exact_expectation(model, prompt, continuation, mask_id, weighted=True):
    """E over l ~ U{1..L} and l-subsets M of (L / l) * sum_{i in M} log p(c_i | c with M masked), by enumeration;
    and the standard deviation of that per-sample quantity."""
    length, values, probs = len(continuation), [], []
    for count in range(1, length + 1):
        subsets = list(itertools.combinations(range(length), count))
        for subset in subsets:
            noisy = torch.cat([prompt, continuation])
            noisy[[len(prompt) + i for i in subset]] = mask_id
            with torch.no_grad():
                lp = model(noisy[None]).logits[0, len(prompt):].float().log_softmax(-1)
            score = sum(float(lp[i, continuation[i]]) for i in subset)
            values.append(score * (length / count if weighted else 1.0))
            probs.append(1 / length / len(subsets))
    mean = sum(p * v for p, v in zip(probs, values))
    std = math.sqrt(sum(p * (v - mean) ** 2 for p, v in zip(probs, values)))
    return mean, std


def test_the_estimate_converges_to_the_expectation_over_every_mask(model_and_tok):
    model, tok = model_and_tok
    prompt = torch.tensor(tok("zip:ab,cd", add_special_tokens=False)["input_ids"])
    continuation = torch.tensor(tok("acb", add_special_tokens=False)["input_ids"])
    want, std = exact_expectation(model, prompt, continuation, tok.mask_token_id)
    unweighted, _ = exact_expectation(model, prompt, continuation, tok.mask_token_id, weighted=False)
    mc_num = 2048
    tolerance = 4 * std / math.sqrt(mc_num)  # stratified counts only shrink the spread
    assert abs(want - unweighted) > 10 * tolerance  # the L / l weight matters at this tolerance
    got = loglikelihood(model, prompt, continuation, mask_id=tok.mask_token_id, mc_num=mc_num, batch_size=32,
                        generator=torch.Generator().manual_seed(1))
    assert abs(got - want) < tolerance


def test_seeded_estimates_repeat_and_padding_is_left_unattended(model_and_tok):
    model, tok = model_and_tok
    prompt = torch.tensor(tok("rev:abc", add_special_tokens=False)["input_ids"])
    continuation = torch.tensor(tok("cba", add_special_tokens=False)["input_ids"])
    kw = dict(mask_id=tok.mask_token_id, mc_num=16, batch_size=8)
    one = loglikelihood(model, prompt, continuation, generator=torch.Generator().manual_seed(5), **kw)
    assert one == loglikelihood(model, prompt, continuation, generator=torch.Generator().manual_seed(5), **kw)
    assert one != loglikelihood(model, prompt, continuation, generator=torch.Generator().manual_seed(6), **kw)
    # Left padding with its mask 0 moves the positions only: the embedded model reads absolute positions, so
    # compare against the same padded layout scored with the padding attended explicitly off.
    padded = torch.cat([torch.full((3,), tok.pad_token_id), prompt])
    pad_mask = torch.cat([torch.zeros(3, dtype=torch.long), torch.ones(len(prompt), dtype=torch.long)])
    a = loglikelihood(model, padded, continuation, prompt_mask=pad_mask, generator=torch.Generator().manual_seed(5),
                      **kw)
    b = loglikelihood(model, padded, continuation, generator=torch.Generator().manual_seed(5), **kw)
    assert a == pytest.approx(b, abs=1e-5)  # the embedded model never attends [PAD], mask or not


def test_mask_counts_are_stratified_over_one_to_length():
    for length, batch in ((3, 32), (7, 4), (1, 5), (40, 32)):
        for seed in range(5):
            counts = mask_counts(length, batch, torch.Generator().manual_seed(seed))
            assert counts.shape == (batch,) and counts.min() >= 1 and counts.max() <= length
            # An even spread: each count is drawn batch / length times, up to rounding.
            histogram = torch.bincount(counts - 1, minlength=length)
            if batch >= length:
                assert histogram.max() - histogram.min() <= 1
            else:
                assert len(set(counts.tolist())) == batch


def test_greedy_matches_the_models_own_greedy_answer_only(model_and_tok):
    model, tok = model_and_tok
    prompt = torch.tensor(tok("rev:abc", add_special_tokens=False)["input_ids"])
    answer = generate(model, prompt[None], gen_length=3, steps=3, mask_id=tok.mask_token_id).generated[0]
    assert greedy_matches(model, prompt, answer, mask_id=tok.mask_token_id)
    other = answer.clone()
    other[1] = (int(other[1]) + 1) % tok.mask_token_id
    assert not greedy_matches(model, prompt, other, mask_id=tok.mask_token_id)


def test_bad_inputs_and_a_block_causal_model_are_refused(model_and_tok):
    model, tok = model_and_tok
    prompt = torch.tensor(tok("rev:abc", add_special_tokens=False)["input_ids"])
    cont = torch.tensor(tok("cba", add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match="mc_num=100 must be a multiple of batch_size=32.*mc_num=96"):
        loglikelihood(model, prompt, cont, mask_id=tok.mask_token_id, mc_num=100)
    with pytest.raises(ValueError, match="nothing to score"):
        loglikelihood(model, prompt, cont[:0], mask_id=tok.mask_token_id)
    with pytest.raises(ValueError, match="holds the mask token"):
        loglikelihood(model, prompt, torch.tensor([tok.mask_token_id]), mask_id=tok.mask_token_id)
    cfg = text_model_config(len(tok), tok.pad_token_id, hidden_size=32, num_layers=1, num_heads=4, max_positions=32,
                            block_length=4, prompt_length=8)
    block_causal = DiffusionLlama(cfg).eval()
    for score in (loglikelihood, greedy_matches):
        with pytest.raises(ValueError, match="block-causal model denoises one block at a time"):
            score(block_causal, prompt, cont, mask_id=tok.mask_token_id)
