"""The ``diffexit`` lm-eval model's ``loglikelihood``: LLaDA's estimator (diffexit.dllm.likelihood) on the request's
embedded layout, seeded by the request, and a multiple-choice task run offline through ``diffexit eval``."""

import json

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from diffexit.app.eval.command import main as eval_main  # noqa: E402
from diffexit.app.eval.lm import DiffexitLM, LoglikelihoodUnsupported  # noqa: E402
from diffexit.app.job_inputs import item_seed  # noqa: E402
from diffexit.dllm.charlm.model import load_embedded_text_model  # noqa: E402
from diffexit.dllm.charlm.tokenizer import encode_prompts  # noqa: E402
from diffexit.dllm.generate import generate  # noqa: E402
from diffexit.dllm.likelihood import loglikelihood  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_lm_eval_log_handler():
    """As in test_eval.py: each command makes its own lm-eval log handler."""
    import logging

    import lm_eval.utils

    yield
    logger = logging.getLogger("lm_eval")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    lm_eval.utils._LOGGING_CONFIGURED = False


def request(context, continuation, idx=0, task="reverse"):
    return Instance("loglikelihood", {"task": task, "prompt": context}, (context, continuation), idx,
                    task_name="t", doc_id=0)


def test_scores_are_the_estimator_on_the_padded_layout_and_is_greedy_is_the_greedy_answer():
    lm = DiffexitLM(model="charlm", mc_num=8)
    model, tok = load_embedded_text_model()
    prompt = "rev:kbtqzea"
    ids, mask = encode_prompts(tok, [prompt], 24)
    greedy = generate(model, ids, attention_mask=mask, gen_length=7, steps=7, mask_id=tok.mask_token_id).generated[0]
    greedy_text = tok.decode(greedy.tolist())
    other = "aezqtkb" if greedy_text != "aezqtkb" else "aezqtbk"
    (ll, is_greedy), (ll_other, other_greedy) = lm.loglikelihood([request(prompt, greedy_text),
                                                                  request(prompt, other, idx=1)])
    target = torch.tensor(tok(greedy_text, add_special_tokens=False)["input_ids"])
    want = loglikelihood(model, ids[0], target, mask_id=tok.mask_token_id, mc_num=8, batch_size=8,
                         prompt_mask=mask[0],
                         generator=torch.Generator().manual_seed(item_seed(f"{prompt}\x00{greedy_text}")))
    assert ll == pytest.approx(want, abs=1e-4)
    assert is_greedy is True and other_greedy is False
    assert ll > ll_other
    assert [r["nfe"] for r in lm.records] == [1 + 7, 1 + 7]  # one pass of 8 samples, then 7 greedy steps


def test_the_estimator_cannot_apply_to_a_block_causal_model_or_rolling_loglikelihood():
    lm = DiffexitLM(model="charlm-block", mc_num=8)
    with pytest.raises(LoglikelihoodUnsupported, match="block-causal model denoises one block at a time"):
        lm.loglikelihood([request("rev:abc", "cba")])
    with pytest.raises(LoglikelihoodUnsupported, match="rolling log-likelihoods"):
        lm.loglikelihood_rolling([request("rev:abc", "cba")])


@pytest.mark.parametrize("options, message", [
    ({"mc_num": 100}, "mc_num=100 must be at most 32 or a multiple of it"),
    ({"mc_num": -1}, "mc_num must be a whole number"),
    ({"is_check_greedy": "maybe"}, "is_check_greedy must be true or false"),
])
def test_bad_likelihood_options_name_the_key(options, message):
    with pytest.raises(ValueError, match=message):
        DiffexitLM(model="charlm", **options)


def test_a_multiple_choice_task_runs_offline(tmp_path):
    code = eval_main(["--tasks", "diffexit_reverse_choice", "--limit", "3", "--model_args",
                      "mc_num=8,is_check_greedy=false", "--log_samples", "--output_path", str(tmp_path)])
    assert code == 0
    (results,) = tmp_path.rglob("results_*.json")
    assert 0.0 <= json.loads(results.read_text())["results"]["diffexit_reverse_choice"]["acc,none"] <= 1.0
    (samples,) = tmp_path.rglob("samples_diffexit_reverse_choice_*.jsonl")
    docs = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(docs) == 3
    for doc in docs:
        # One request per choice, each one forward pass of 8 samples.
        assert len(doc["diffexit"]) == len(doc["arguments"]) >= 3 and {r["nfe"] for r in doc["diffexit"]} == {1}


@pytest.fixture(scope="module")
def transformers_folder(tmp_path_factory, tiny_text_model):
    from transformers import LlamaForCausalLM

    model, tok = tiny_text_model(max_positions=64, initializer_range=0.5, never_predict_mask=True,
                                 cls=LlamaForCausalLM)
    folder = tmp_path_factory.mktemp("transformers")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


def test_a_transformers_model_scores_llada_s_token_pair(transformers_folder):
    folder, model, tok = transformers_folder
    lm = DiffexitLM(model=str(folder), mc_num=8, is_check_greedy=False)
    ((ll, greedy),) = lm.loglikelihood([request("rev:abc ", "cba", task=None)])
    # LLaDA's pairing: the context's trailing space belongs to the continuation.
    prompt = torch.tensor([tok.convert_tokens_to_ids(c) for c in "rev:abc"])
    target = torch.tensor([tok.convert_tokens_to_ids(c) for c in " cba"])
    want = loglikelihood(model, prompt, target, mask_id=tok.mask_token_id, mc_num=8, batch_size=8,
                         generator=torch.Generator().manual_seed(item_seed("rev:abc \x00cba")))
    assert ll == pytest.approx(want, abs=1e-4) and greedy is False
    dream = DiffexitLM(model=str(folder), loop="dream", mc_num=8)
    with pytest.raises(LoglikelihoodUnsupported, match="the dream loop's model shifts them"):
        dream.loglikelihood([request("rev:abc", "cba", task=None)])
