"""The learned commit rule: threshold 1 is full steps in every loop and cache, what clears commits, the end-of-text
tail, halting replayed from a recording equals the loop's, refusals, and DecodeSpec."""

import pytest
import torch

from diffexit.dllm import dream_generate, generate
from diffexit.dllm.charlm.model import load_embedded_block_model, load_embedded_text_model
from diffexit.dllm.charlm.tasks import sample
from diffexit.dllm.charlm.tokenizer import decode_answer, encode_prompts
from diffexit.dllm.commit_rule import CommitModel, CommitNet, CommitRule, eos_tail, weights_digest
from diffexit.dllm.commit_training import halted_spans, record
from diffexit.dllm.decode_spec import DecodeSpec

MASK = 39  # conftest's tiny model


def always(model, blocks, bias=50.0, eos=(0,)):
    """A commit model for ``model`` whose net says "final" with probability 1.0 (float32) everywhere."""
    net = CommitNet()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.mlp[-1].bias.fill_(bias)
    return CommitModel(net, int(model.config.vocab_size), tuple(blocks), weights_digest(model), eos, {}, {})


@pytest.fixture(scope="module")
def charlm():
    return load_embedded_text_model()


@pytest.fixture(scope="module")
def charlm_block():
    return load_embedded_block_model()


def prompts(tok, task="zip", n=6):
    return encode_prompts(tok, [e.prompt for e in sample(task, "heldout", seed=0, n=n)], 24)


@pytest.mark.parametrize("mode", ["commit", "halt"])
@pytest.mark.parametrize("cache", [None, "prefix"])
def test_threshold_one_is_full_steps_on_both_embedded_models(charlm, charlm_block, mode, cache):
    for (model, tok), passes in ((charlm, 1), (charlm_block, 4)):
        block = 4
        ids, attn = prompts(tok)
        kw = dict(attention_mask=attn, gen_length=16, steps=16, block_length=block, mask_id=tok.mask_token_id,
                  cache=cache)
        full = generate(model, ids, **kw)
        rule = CommitRule(always(model, [block], eos=(tok.eos_token_id,)), mode, threshold=1.0)
        out = generate(model, ids, halting=rule, **kw)
        assert torch.equal(out.sequences, full.sequences)
        assert torch.equal(out.nfe, full.nfe)
        # The same net below 1 clears everything at once (per block on the block-causal model): the test would see
        # a rule that fires.
        fired = generate(model, ids, halting=CommitRule(always(model, [block]), mode, threshold=0.5), **kw)
        assert fired.nfe.tolist() == [passes] * len(ids)


def test_threshold_one_is_full_steps_in_dreams_loop(tiny_llama):
    ids = torch.randint(0, MASK, (3, 5), generator=torch.Generator().manual_seed(1))
    for alg in ("maskgit_plus", "entropy"):
        full = dream_generate(tiny_llama, ids, gen_length=8, steps=8, mask_id=MASK, alg=alg)
        out = dream_generate(tiny_llama, ids, gen_length=8, steps=8, mask_id=MASK, alg=alg,
                             halting=CommitRule(always(tiny_llama, [8]), "commit", threshold=1.0))
        assert torch.equal(out.sequences, full.sequences) and torch.equal(out.nfe, full.nfe)


def test_a_rule_that_clears_everything_fills_the_first_pass_argmax(tiny_llama):
    ids = torch.randint(0, MASK, (2, 5), generator=torch.Generator().manual_seed(2))
    x = torch.cat([ids, torch.full((2, 8), MASK)], 1)
    first = tiny_llama(x).logits[:, 5:].argmax(-1)
    for mode in ("commit", "halt"):
        out = generate(tiny_llama, ids, gen_length=8, steps=8, block_length=4, mask_id=MASK,
                       halting=CommitRule(always(tiny_llama, [4]), mode, threshold=0.5))
        assert torch.equal(out.generated, first) and out.nfe.tolist() == [1, 1]
    shifted = torch.cat([tiny_llama(x).logits[:, :1], tiny_llama(x).logits[:, :-1]], 1)[:, 5:].argmax(-1)
    out = dream_generate(tiny_llama, ids, gen_length=8, steps=8, mask_id=MASK, alg="maskgit_plus",
                         halting=CommitRule(always(tiny_llama, [8]), "commit", threshold=0.5))
    assert torch.equal(out.generated, shifted) and out.nfe.tolist() == [1, 1]


def test_eos_tail_against_a_scan_from_the_end():
    g = torch.Generator().manual_seed(3)
    mask, eos = 9, (0, 1)
    for _ in range(200):
        span = torch.randint(0, 10, (1, 8), generator=g)
        span[span > 3] = mask  # many masks, some committed EOS/pad, some content
        top1 = torch.randint(0, 4, (1, 8), generator=g)
        clear = torch.rand(1, 8, generator=g) > 0.3
        # Independent: walk back from the end while the position is (or is predicted) end-of-text.
        suffix = []
        for j in reversed(range(8)):
            tok = int(span[0, j])
            if tok in eos or (tok == mask and int(top1[0, j]) in eos):
                suffix.append(j)
            else:
                break
        masked_suffix = sorted(j for j in suffix if int(span[0, j]) == mask)
        want = torch.zeros(1, 8, dtype=torch.bool)
        if masked_suffix and bool(clear[0, masked_suffix[0]]):
            want[0, masked_suffix] = True
        assert torch.equal(eos_tail(span, top1, clear & (span == mask), mask, eos), want)


@pytest.mark.parametrize("which", ["charlm", "charlm_block"])
def test_halting_replayed_from_a_recording_is_the_loops_halting(which, request):
    model, tok = request.getfixturevalue(which)
    ids, attn = prompts(tok, "trio", n=4)
    kw = dict(gen_length=16, steps=16, block_length=4, mask_id=tok.mask_token_id)
    eos = (tok.eos_token_id, tok.pad_token_id)
    # One prompt at a time: a batch whose rows halt at different steps changes the matmul shapes, and a coin-flip
    # choice of trio can flip on the last bit of a logit.
    recs = [record(model, ids[i:i + 1], attn[i:i + 1], eos_token_ids=eos, **kw) for i in range(len(ids))]
    # A random net standardised on the recorded features gives probabilities spread over (0, 1).
    feats = torch.cat([r.examples()[0] for r in recs])
    torch.manual_seed(0)
    net = CommitNet()
    net.mean.copy_(feats.mean(0))
    net.std.copy_(feats.std(0).clamp(min=1e-3))
    with torch.no_grad():
        p = torch.sigmoid(net(feats))
    # Thresholds midway between neighbouring probabilities, so a last-bit difference cannot flip a comparison.
    ordered = p.unique().sort().values
    gaps = [i for i in range(len(ordered) - 1) if ordered[i + 1] - ordered[i] > 1e-4]
    thresholds = [float(ordered[i] + ordered[i + 1]) / 2 for i in (gaps[len(gaps) // 5], gaps[len(gaps) // 2],
                                                                    gaps[4 * len(gaps) // 5])]
    commit_model = CommitModel(net, int(model.config.vocab_size), (4,), weights_digest(model), eos, {}, {})
    per_block = which == "charlm_block"
    nfes = set()
    for i, rec in enumerate(recs):
        spans, nfe = halted_spans(rec, net, thresholds)
        for j, t in enumerate(thresholds):
            out = generate(model, ids[i:i + 1], attention_mask=attn[i:i + 1],
                           halting=CommitRule(commit_model, "halt", t), **kw)
            replay_changed = decode_answer(tok, spans[j][0]) != decode_answer(tok, rec.final[0])
            assert replay_changed == (decode_answer(tok, out.generated[0]) != decode_answer(tok, rec.final[0]))
            if not per_block or torch.equal(spans[j], rec.final):
                # Exact whole-span halting; per block, exact while no block halts wrong (after one that does, the
                # later blocks follow another trajectory, and only the answer's change is the same).
                assert torch.equal(out.generated, spans[j])
                assert out.nfe.float().tolist() == nfe[j].tolist()
            nfes.add(int(out.nfe))
    assert len(nfes) > 1  # the thresholds halt at different steps


def test_a_commit_model_for_another_model_is_refused(tmp_path, charlm, charlm_block, tiny_llama):
    model, tok = charlm
    path = always(model, [4, 34]).save(tmp_path / "c.safetensors")
    loaded = CommitModel.load(path)
    assert loaded.block_lengths == (4, 34) and loaded.lm_digest == weights_digest(model)
    ids, attn = prompts(tok, n=1)
    kw = dict(attention_mask=attn, gen_length=16, steps=16, mask_id=tok.mask_token_id)
    with pytest.raises(ValueError, match=r"weights .*`diffexit train commit`"):
        generate(charlm_block[0], ids, block_length=4, halting=CommitRule(str(path)), **kw)
    with pytest.raises(ValueError, match=r"blocks of \[4, 34\].*block_length in"):
        generate(model, ids, block_length=8, halting=CommitRule(str(path), threshold=0.9), **kw)
    with pytest.raises(ValueError, match=r"vocabulary of 99, the model has 40"):
        generate(tiny_llama, torch.ones(1, 3, dtype=torch.long), gen_length=4, steps=4, mask_id=MASK,
                 halting=CommitRule(str(path), threshold=0.9))
    with pytest.raises(ValueError, match="no calibrated threshold for mode 'commit'"):
        generate(model, ids, block_length=4, halting=CommitRule(str(path)), **kw)
    (tmp_path / "x.safetensors").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a commit model.*diffexit train commit"):
        CommitModel.load(tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="no commit model at"):
        CommitModel.load(tmp_path / "missing.safetensors")


def test_learned_names_the_file_beside_the_models_weights(tmp_path, tiny_llama):
    with pytest.raises(ValueError, match="shipped beside the model's weights.*diffexit train commit"):
        generate(tiny_llama, torch.ones(1, 3, dtype=torch.long), gen_length=4, steps=4, mask_id=MASK,
                 halting=CommitRule("learned", threshold=0.9))


def test_decode_spec_takes_the_rule():
    spec = DecodeSpec(gen_length=16, steps=16, block_length=4, commit="learned", commit_mode="halt",
                      commit_threshold=0.9)
    rule = spec.loop_kwargs()["halting"]
    assert isinstance(rule, CommitRule) and (rule.mode, rule.threshold, rule.source) == ("halt", 0.9, "learned")
    assert spec.rule_name == "learned-halt" and DecodeSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="replaces method 'sched'"):
        DecodeSpec(commit="learned", method="sched")
    with pytest.raises(ValueError, match="give commit='learned'"):
        DecodeSpec(commit_threshold=0.9)
    with pytest.raises(ValueError, match=r"probability in \(0, 1\]"):
        DecodeSpec(commit="learned", commit_threshold=1.5)
    with pytest.raises(ValueError, match="commit mode must be one of"):
        DecodeSpec(commit="learned", commit_mode="fast")
