"""The demo's text tab with a KV cache and parallel commits, through the one door for decoding options
(:class:`~diffexit.dllm.decode_spec.DecodeSpec`), on the embedded ``charlm`` and the block-causal ``charlm-block``.

The handlers are called in-process, the way gradio calls them; what a bad option says is compared with what
``DecodeSpec`` and the decoding loop say to ``generate text``.
"""

import pytest

from diffexit.app.demo import Demo, Models, example

PICK = example("pick", 0)  # (prompt, gen_length 16, steps 16, block 4)
FULL = "none (full steps)"


@pytest.fixture(scope="module")
def block_demo():
    return Demo(Models(text_model="charlm-block"))


@pytest.fixture(scope="module")
def demo():
    return Demo(Models(text_model="charlm"))


def decode(demo, halting=FULL, cache="none", parallel=0.0, prompt=PICK):
    """Every update of one decode; the last is ``(answer, summary, span, plot, table, details)``."""
    text, gen_length, steps, block = prompt
    return list(demo.text(text, gen_length, steps, block, halting, "cosine", 7.5, 2.5, 4.0, "min", cache, parallel))


def refusal(demo, **changes) -> str:
    import gradio as gr

    with pytest.raises(gr.Error) as info:
        decode(demo, **changes)
    return info.value.message


def test_the_prefix_cache_is_exact_on_the_block_causal_model(block_demo):
    plain, cached = decode(block_demo)[-1], decode(block_demo, cache="prefix")[-1]
    assert cached[5]["answer"] == plain[5]["answer"] == cached[5]["full_steps_answer"]
    assert cached[5]["nfe"] == plain[5]["nfe"] == 16 and cached[5]["cache"] == "prefix"
    assert cached[5]["decode"]["cache"] == "prefix" and plain[5]["decode"]["cache"] is None
    # The summary shows the passes and the wall-clock of both decodes.
    assert "**NFE 16**" in cached[1] and "cache prefix" in cached[1] and " s against " in cached[1]
    assert cached[5]["seconds"] > 0 and cached[5]["seconds_full_steps"] > 0


def test_a_cached_decode_streams_the_whole_span(block_demo):
    from diffexit.app.demo import MASK_GLYPH

    updates = decode(block_demo, cache="prefix")
    # The cached decode's updates; then the plain full-steps decode streams its own, from all masked again.
    spans = ["".join(glyph for glyph, _ in u[2]) for u in updates[:-1] if u[1].startswith("Decoding with")]
    # A cached pass reads a window of the sequence; the page still shows all 16 positions, unmasking in order.
    assert spans and all(len(s) == 16 for s in spans) and spans[0] == MASK_GLYPH * 16
    masked = [s.count(MASK_GLYPH) for s in spans]
    assert masked == sorted(masked, reverse=True)


def test_dual_on_the_block_causal_model_is_refused_with_the_loops_message(block_demo):
    from diffexit.dllm.charlm.tokenizer import encode_prompts
    from diffexit.dllm.generate import generate

    model, tok = block_demo.models.text()
    ids, attn = encode_prompts(tok, [PICK[0]], 24)
    with pytest.raises(ValueError) as loop:
        generate(model, ids, attention_mask=attn, gen_length=16, steps=16, block_length=4, cache="dual",
                 mask_id=tok.mask_token_id)
    assert refusal(block_demo, cache="dual") == str(loop.value)
    assert "use cache='prefix'" in str(loop.value)


@pytest.mark.parametrize("changes, option", [
    (dict(parallel=1.5), dict(parallel_threshold=1.5)),
    (dict(parallel=-0.5), dict(parallel_threshold=-0.5)),
    (dict(cache="triple"), dict(cache="triple")),
])
def test_a_bad_option_gets_the_spec_s_message(demo, changes, option):
    from diffexit.dllm.decode_spec import DecodeSpec

    with pytest.raises(ValueError) as spec:
        DecodeSpec(**option)
    assert refusal(demo, **changes) == str(spec.value)


def test_parallel_commits_cut_the_passes_and_keep_the_answer(demo):
    full = decode(demo)[-1][5]
    final = decode(demo, parallel=0.9)[-1]
    details = final[5]
    assert details["parallel_threshold"] == 0.9 and details["halting"] == "full steps"
    # The comparison is plain full steps: no cache, no parallel commits.
    assert details["full_steps_nfe"] == 16 and details["full_steps_answer"] == full["answer"]
    assert details["nfe"] < 16 and details["answer"] == full["answer"]
    assert f"**NFE {details['nfe']}** against 16" in final[1] and "parallel >= 0.9" in final[1]


def test_halting_and_parallel_commits_compose(demo):
    details = decode(demo, halting="SchED", parallel=0.9, cache="prefix")[-1][5]
    assert details["decode"]["method"] == "sched" and details["decode"]["cache"] == "prefix"
    assert 1 <= details["nfe"] <= 16 and details["full_steps_nfe"] == 16


def test_the_page_reads_the_statistics_table_and_a_block_causal_models_blocks():
    import gradio as gr

    from diffexit.app.demo import build_app
    from diffexit.dllm.statistics import SPAN, describe, names

    app = build_app(text_model="charlm-block")
    stat = next(b for b in app.blocks.values() if isinstance(b, gr.Dropdown)
                and b.label == "statistic over the masked span")
    assert [value for _, value in stat.choices] == list(names(SPAN)) and stat.info == describe(SPAN)
    preset = next(fn for fn in app.fns.values() if fn.api_name == "example").fn
    # chain's layout decodes in blocks of 34; the block-causal model only in its own blocks of 4.
    assert preset("chain")[1:] == (example("chain", 0)[0], 136, 136, 4)
    assert example("chain", 0)[3] == 34
