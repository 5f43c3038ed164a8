"""DecodeSpec: one checked object for a decode's options, the same message for the same bad spec on every surface,
its round trip through job.json, and the embedded models by name (charlm-block's exact cache through generate text)."""

import contextlib
import io
import json
import math

import pytest
import torch

from diffexit.app import generate_text
from diffexit.dllm.decode_spec import DecodeSpec, option_names, spec_from_options
from diffexit.dllm.generate import generate
from diffexit.dllm.halting import SchED
from diffexit.samplers import ThresholdSchedule


def _error_of(fn) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    return str(info.value)


def _cli(argv, out):
    """``(exit code, stderr)`` of ``diffexit generate text``."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = generate_text.main([*argv, "--out", str(out)])
    return code, err.getvalue()


def test_round_trips_through_json_and_refuses_unknown_keys():
    spec = DecodeSpec(gen_length=16, steps=16, block_length=4, cache="prefix", parallel_threshold=0.9,
                      method="sched", params={"schedule": "cosine:7.5:2.5", "stat": "quantile", "q": 0.2})
    data = json.loads(json.dumps(spec.to_dict()))
    assert DecodeSpec.from_dict(data) == spec
    assert data["params"]["schedule"] == {"kind": "cosine", "high": 7.5, "low": 2.5, "k": None}
    assert "unknown decode option(s) ['caches']" in _error_of(lambda: DecodeSpec.from_dict({**data, "caches": 1}))
    # Flat, user-named options: the spec's fields and the rule's parameters by their names.
    assert spec_from_options({"gen_length": 16, "steps": 16, "block_length": 4, "cache": "prefix",
                              "parallel_threshold": 0.9, "method": "sched", "schedule": "cosine:7.5:2.5",
                              "stat": "quantile", "q": 0.2}) == spec
    message = _error_of(lambda: spec_from_options({"halt": "sched"}))
    assert "unknown decode option(s) ['halt']" in message and all(k in message for k in option_names())


@pytest.mark.parametrize("options, message", [
    ({"parallel_threshold": math.nan}, "parallel_threshold must be a probability in (0, 1], got nan"),
    ({"parallel_threshold": 1.5}, "parallel_threshold must be a probability in (0, 1], got 1.5"),
    ({"gen_length": 16, "steps": 16, "block_length": 3}, "block_length must divide gen_length=16, got 3"),
    ({"gen_length": 16, "steps": 15, "block_length": 4}, "steps=15 must be a multiple of the number of blocks"),
    ({"cache": "full"}, "cache must be none or one of ['prefix', 'dual'], got 'full'"),
    ({"steps": 0}, "steps must be a positive whole number, got 0"),
    ({"cache_refresh": 2}, "cache_refresh=2 refreshes the kept K/V of an approximate cache, and there is no cache"),
    ({"cache": "prefix", "cache_refresh": 0}, "cache_refresh must be None (keep a block's first K/V), a whole number"),
    ({"cache": "prefix", "cache_refresh": "confidence:0.9", "remasking": "random"},
     "random remasking commits by a uniform draw"),
    ({"loop": "dream", "cache": "prefix"}, "cache: an option of the llada loop"),
    ({"method": "prophet", "params": {"thresholds": [math.nan, 5.0, 2.5]}}, "three finite numbers"),
    ({"method": "sched", "params": {"schedule": "cosine:inf:2.5"}}, "high must be a finite number"),
    ({"method": "full", "params": {"stat": "min"}}, "stat is a parameter of method 'sched'"),
])
def test_bad_options_name_the_problem(options, message):
    assert message in _error_of(lambda: DecodeSpec(**options))


def test_the_same_bad_spec_gets_the_same_message_from_the_pipeline_and_the_command_line(tmp_path):
    from diffexit.dllm.charlm.model import load_embedded_text_model
    from diffexit.dllm.pipeline import MaskedDiffusionPipeline

    model, tok = load_embedded_text_model()
    pipe = MaskedDiffusionPipeline(model, tok)
    for options, flags in (({"parallel_threshold": 1.5}, ["--parallel-threshold", "1.5"]),
                           ({"gen_length": 16, "steps": 16, "block_length": 3},
                            ["--gen-length", "16", "--steps", "16", "--block-length", "3"])):
        expected = _error_of(lambda: DecodeSpec(**options))
        assert _error_of(lambda: pipe("12+34=", **{"gen_length": 16, "steps": 16, **options})) == expected
        code, err = _cli(["--task", "add", "--n", "1", *flags], tmp_path / "out")
        assert code == 2 and err.strip().endswith(expected) and not (tmp_path / "out").exists()


def test_loop_kwargs_decode_as_the_loop_called_directly():
    from diffexit.dllm.charlm.model import load_embedded_text_model
    from diffexit.dllm.charlm.tasks import sample
    from diffexit.dllm.charlm.tokenizer import encode_prompts

    model, tok = load_embedded_text_model()
    ids, attn = encode_prompts(tok, [e.prompt for e in sample("pick", "heldout", 0, 6)], 24)
    spec = DecodeSpec(gen_length=16, steps=16, block_length=4, parallel_threshold=0.9, method="sched",
                      params={"schedule": "cosine:7.5:2.5", "stat": "min"})
    ours = generate(model, ids, attention_mask=attn, mask_id=tok.mask_token_id, **spec.loop_kwargs())
    direct = generate(model, ids, attention_mask=attn, mask_id=tok.mask_token_id, gen_length=16, steps=16,
                      block_length=4, parallel_threshold=0.9,
                      halting=SchED(ThresholdSchedule("cosine", 7.5, 2.5), stat="min"))
    assert torch.equal(ours.sequences, direct.sequences) and torch.equal(ours.nfe, direct.nfe)


def test_block_model_by_name_with_the_exact_cache_gives_the_uncached_answers(tmp_path):
    runs = {}
    for name, flags in (("plain", []), ("cached", ["--cache", "prefix"])):
        code, err = _cli(["--task", "zip", "--n", "6", "--model", "charlm-block", *flags], tmp_path / name)
        assert code == 0, err
        runs[name] = [json.loads(line) for line in (tmp_path / name / "outputs.jsonl").read_text().splitlines()]
    assert [r["output"] for r in runs["cached"]] == [r["output"] for r in runs["plain"]]
    assert all(r["correct"] for r in runs["plain"])
    job = json.loads((tmp_path / "cached" / "job.json").read_text())
    assert DecodeSpec.from_dict(job["decode"]) == DecodeSpec(cache="prefix")
    # A resumed job cannot mix specs.
    code, err = _cli(["--task", "zip", "--n", "6", "--model", "charlm-block"], tmp_path / "cached")
    assert code == 2 and "pass another --out" in err


def test_an_unknown_model_name_lists_the_embedded_ones_at_once(tmp_path):
    code, err = _cli(["--task", "zip", "--n", "1", "--model", "charlm-blok"], tmp_path / "out")
    assert code == 2 and "['charlm', 'charlm-block', 'gemma']" in err and "Hub" in err


def test_the_shared_text_loader_takes_the_embedded_names():
    from pathlib import Path

    from diffexit.app.models import load_text_model_or_embedded

    model, _ = load_text_model_or_embedded(Path("charlm-block"))
    assert model.config.block_length == 4
    with pytest.raises(ValueError, match=r"one of \['charlm', 'charlm-block', 'gemma'\]"):
        load_text_model_or_embedded(Path("charlm-blok"))


def test_a_prophet_spec_survives_replace_and_json():
    # Prophet.to_dict writes its phase cutoffs; the spec must take back what the rule writes.
    from diffexit.dllm.decode_spec import DecodeSpec

    spec = DecodeSpec(method="prophet", params={"cutoffs": [0.25, 0.75]})
    again = DecodeSpec.from_dict(spec.replace(steps=8, gen_length=8).to_dict())
    assert again.params["cutoffs"] == [0.25, 0.75]
    assert again.halting_rule().cutoffs == (0.25, 0.75)


def test_a_cache_refresh_is_normalised_round_trips_and_reaches_the_loop():
    spec = DecodeSpec(gen_length=16, steps=16, block_length=4, cache="dual", cache_refresh="confidence:.9")
    assert spec.cache_refresh == "confidence:0.9" and DecodeSpec(cache="prefix", cache_refresh="3").cache_refresh == 3
    assert DecodeSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.loop_kwargs()["cache_refresh"] == "confidence:0.9"
    assert spec.describe() == "full, cache dual refreshed after commits at p <= 0.9"
    assert spec_from_options({"cache": "prefix", "cache_refresh": 2}).cache_refresh == 2


def test_generate_text_with_a_refresh_at_every_commit_gives_the_uncached_answers(tmp_path):
    # Short tasks decode 4 tokens a block in 4 steps: every step commits one, so confidence:1 refreshes at each.
    runs = {}
    for name, flags in (("plain", []), ("refreshed", ["--cache", "prefix", "--cache-refresh", "confidence:1"])):
        code, err = _cli(["--task", "pick", "--n", "4", *flags], tmp_path / name)
        assert code == 0, err
        lines = (tmp_path / name / "outputs.jsonl").read_text().splitlines()
        runs[name] = [json.loads(line)["output"] for line in lines]
    assert runs["refreshed"] == runs["plain"]
    job = json.loads((tmp_path / "refreshed" / "job.json").read_text())
    assert DecodeSpec.from_dict(job["decode"]) == DecodeSpec(cache="prefix", cache_refresh="confidence:1.0")


@pytest.mark.parametrize("argv, message", [
    (["--model", "charlm-block", "--cache", "prefix", "--cache-refresh", "2"],
     "block-causal model --cache prefix is exact"),
    (["--cache-refresh", "2"], "cache_refresh=2 refreshes the kept K/V of an approximate cache, and there is no cache"),
    (["--cache", "prefix", "--cache-refresh", "often"], "cache_refresh must be None"),
])
def test_generate_text_refuses_a_cache_refresh_it_cannot_use_before_any_work(tmp_path, argv, message):
    code, err = _cli(["--task", "zip", "--n", "1", *argv], tmp_path / "out")
    assert code == 2 and message in err and not (tmp_path / "out" / "outputs.jsonl").exists()
