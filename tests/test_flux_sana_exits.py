"""Early exits on tiny random Flux and Sana transformers, and in FluxPipeline and SanaPipeline.

Flux runs two block stacks (dual-stream, then single-stream) behind one block index, with rotary position
embeddings, packed tokens and (FLUX.1-dev) a guidance embedding; Sana has no ``inner_dim``, a guidance embedding in
its Sprint form, and a feed-forward that convolves over the token grid. Each test re-derives what it expects from the
models' own modules, written out here from the diffusers 0.42 source.
"""

import pytest
import torch
from diffusers import FluxTransformer2DModel, SanaTransformer2DModel

from diffexit.uem import FullDepth, StaticDepth, UEMStack, enable_early_exit, exit_predictions
from diffexit.uem.block_adapters import SUPPORTED, blocks, hidden_size, num_blocks
from diffexit.uem.cached_remainder import CachedRemainder
from diffexit.uem.exit_rules import ExitRule, SimilarityExit

DUAL, SINGLE = 2, 2  # Flux's two stacks: 4 blocks behind one index
SANA_LAYERS = 3
TEXT = 5


def flux(guidance=True):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=DUAL, num_single_layers=SINGLE, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=guidance,
        axes_dims_rope=(2, 2, 4),
    ).eval()

    def make_inputs(batch, seed=3):
        g = torch.Generator().manual_seed(seed)
        side = 4  # a 4 x 4 grid of packed tokens
        img_ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
        inp = {
            "hidden_states": torch.randn(batch, side * side, 4, generator=g),
            "encoder_hidden_states": torch.randn(batch, TEXT, 12, generator=g),
            "pooled_projections": torch.randn(batch, 10, generator=g),
            "timestep": torch.rand(batch, generator=g),  # the pipelines pass sigmas in [0, 1]
            "img_ids": torch.cat([torch.zeros(side * side, 1), img_ids.float()], dim=1),
            "txt_ids": torch.zeros(TEXT, 3),
        }
        if guidance:
            inp["guidance"] = torch.full((batch,), 3.5)
        return inp

    def trace(m, inp):
        h = m.x_embedder(inp["hidden_states"])
        t = inp["timestep"] * 1000
        pooled = inp["pooled_projections"]
        temb = m.time_text_embed(t, inp["guidance"] * 1000, pooled) if guidance else m.time_text_embed(t, pooled)
        text = m.context_embedder(inp["encoder_hidden_states"])
        rope = m.pos_embed(torch.cat([inp["txt_ids"], inp["img_ids"]]))
        states = [h]
        for block in [*m.transformer_blocks, *m.single_transformer_blocks]:
            text, h = block(hidden_states=h, encoder_hidden_states=text, temb=temb, image_rotary_emb=rope)
            states.append(h)
        return states, lambda h: m.proj_out(m.norm_out(h, temb))

    return model, make_inputs, trace


def sana(guidance=False):
    torch.manual_seed(0)
    model = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=SANA_LAYERS,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
        sample_size=8, patch_size=2, guidance_embeds=guidance,
    ).eval()

    def make_inputs(batch, seed=3):
        g = torch.Generator().manual_seed(seed)
        mask = torch.ones(batch, TEXT, dtype=torch.long)
        mask[0, 3:] = 0
        inp = {
            "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, TEXT, 12, generator=g),
            "timestep": torch.randint(0, 1000, (batch,), generator=g),
            "encoder_attention_mask": mask,
        }
        if guidance:
            inp["guidance"] = torch.full((batch,), 4.5)
        return inp

    def trace(m, inp):
        x = inp["hidden_states"]
        b, side, p = x.shape[0], x.shape[-1], 2
        n = side // p
        bias = ((1 - inp["encoder_attention_mask"].float()) * -10000.0).unsqueeze(1)
        h = m.patch_embed(x)
        if guidance:
            t6, emb = m.time_embed(inp["timestep"], guidance=inp["guidance"], hidden_dtype=h.dtype)
        else:
            t6, emb = m.time_embed(inp["timestep"], batch_size=b, hidden_dtype=h.dtype)
        text = m.caption_norm(m.caption_projection(inp["encoder_hidden_states"]).view(b, -1, h.shape[-1]))
        states = [h]
        for block in m.transformer_blocks:
            h = block(h, None, text, bias, t6, n, n)
            states.append(h)

        def head(h):
            shift, scale = (m.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)
            h = m.proj_out(m.norm_out.norm(h) * (1 + scale) + shift)
            return torch.einsum("nhwpqc->nchpwq", h.reshape(b, n, n, p, p, -1)).reshape(b, -1, side, side)

        return states, head

    return model, make_inputs, trace


MODELS = {
    "flux-dev": lambda: flux(guidance=True),
    "flux-schnell": lambda: flux(guidance=False),
    "sana": lambda: sana(guidance=False),
    "sana-sprint": lambda: sana(guidance=True),
}
DEPTH = {"flux-dev": DUAL + SINGLE, "flux-schnell": DUAL + SINGLE, "sana": SANA_LAYERS, "sana-sprint": SANA_LAYERS}


def by_hand(trace, m, inp, k):
    """The model's own head after its first ``k`` blocks."""
    states, head = trace(m, inp)
    return head(states[k])


class AskedEveryBlock(ExitRule):
    """Could stop after any block but never does: the whole forward runs through the adapter, block by block."""

    needs_uem = False

    def __init__(self):
        self.asked = []

    def exits(self, depth, progress, uncertainty):
        self.asked.append(depth)
        return False


def test_the_layouts_two_flux_stacks_behind_one_index_and_sanas_width_without_inner_dim():
    model, _, _ = flux()
    stack = blocks(model)
    assert [id(b) for b in stack] == [id(b) for b in (*model.transformer_blocks, *model.single_transformer_blocks)]
    assert num_blocks(model) == DUAL + SINGLE and hidden_size(model) == 16
    model, _, _ = sana()
    assert not hasattr(model, "inner_dim")
    assert blocks(model) is model.transformer_blocks and num_blocks(model) == SANA_LAYERS
    assert hidden_size(model) == 16 == model.scale_shift_table.shape[-1]
    assert {"FluxTransformer2DModel", "SanaTransformer2DModel"} <= set(SUPPORTED)


@torch.no_grad()
@pytest.mark.parametrize("name", MODELS)
def test_full_depth_through_the_adapter_equals_the_stock_forward(name):
    model, make_inputs, _ = MODELS[name]()
    inp = make_inputs(3)
    ref = model(**inp).sample
    rule = AskedEveryBlock()
    early = enable_early_exit(model, None, rule)
    out = model(**inp)
    assert torch.equal(out.sample, ref)
    assert rule.asked == list(range(1, DEPTH[name]))  # the block loop ran, not the model's own forward
    assert early.last_depths.tolist() == [DEPTH[name]] * 3
    assert torch.equal(model(**inp, return_dict=False)[0], ref)


@torch.no_grad()
@pytest.mark.parametrize("name", MODELS)
def test_exit_after_block_k_is_a_hand_truncated_forward(name):
    model, make_inputs, trace = MODELS[name]()
    inp = make_inputs(3)
    torch.testing.assert_close(by_hand(trace, model, inp, DEPTH[name]), model(**inp).sample, rtol=0, atol=1e-5)
    early = enable_early_exit(model, None, StaticDepth([1]))
    for k in range(1, DEPTH[name] + 1):  # for Flux: inside the dual stack, at its end, inside the single stack
        early.rule = StaticDepth([k])
        torch.testing.assert_close(model(**inp).sample, by_hand(trace, model, inp, k), rtol=0, atol=1e-5)
        assert early.last_depths.tolist() == [k] * 3


@torch.no_grad()
@pytest.mark.parametrize("name", ["flux-dev", "sana"])
def test_uem_exits_compact_the_batch_and_each_sample_equals_its_own_truncated_forward(name, spread_uem):
    model, make_inputs, trace = MODELS[name]()
    uem = spread_uem(model)
    inp = make_inputs(4)
    pred = exit_predictions(model, uem, **inp)
    for k in range(DEPTH[name]):
        torch.testing.assert_close(pred.sample[k], by_hand(trace, model, inp, k + 1), rtol=0, atol=1e-5)
    mean_u = pred.uncertainty.mean(-1)[:-1]  # [L - 1, B]: the blocks a sample can exit after
    # The threshold between the two extreme first-block uncertainties sends some samples out after block 1.
    tau = float(mean_u[0].sort().values[1:3].mean())
    below = mean_u < tau
    want = torch.where(below.any(0), below.int().argmax(0) + 1, DEPTH[name])
    assert len(set(want.tolist())) >= 2, "the check needs samples that exit at different blocks"
    early = enable_early_exit(model, uem, tau, cfg=False)
    batched = model(**inp).sample
    assert early.last_depths.tolist() == want.tolist()
    for i in range(4):
        torch.testing.assert_close(batched[i], pred.sample[int(want[i]) - 1, i], rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("name", MODELS)
def test_similarity_exits_stop_each_sample_where_its_image_tokens_stop_changing(name):
    model, make_inputs, trace = MODELS[name]()
    inp = make_inputs(4)
    states, head = trace(model, inp)
    # Relative change of each block, per sample, over all its image tokens and channels: [L - 1, B].
    change = torch.stack([(states[k] - states[k - 1]).flatten(1).norm(dim=1) / states[k - 1].flatten(1).norm(dim=1)
                          for k in range(1, DEPTH[name])])
    def depths(tolerance):  # the first block whose change is below the tolerance; the last block if none
        below = change < tolerance
        return torch.where(below.any(0), below.int().argmax(0) + 1, DEPTH[name])

    values = change.flatten().sort().values
    tolerance = max((float(a + b) / 2 for a, b in zip(values[:-1], values[1:])),
                    key=lambda tol: len(set(depths(tol).tolist())))
    want = depths(tolerance)
    assert len(set(want.tolist())) >= 2, "the check needs samples that exit at different blocks"
    early = enable_early_exit(model, None, SimilarityExit(tolerance), cfg=False)
    out = model(**inp).sample
    assert early.last_depths.tolist() == want.tolist()
    for i in range(4):
        torch.testing.assert_close(out[i], head(states[int(want[i])])[i], rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("name", MODELS)
def test_a_cached_remainder_adds_the_skipped_blocks_last_residuals(name):
    # Step 0 of two refreshes every block; at step 1 an exit after block k reads h_k plus what blocks k+1..L added
    # to the image tokens at step 0, which telescopes to h_k + (h_L - h_k) of step 0.
    model, make_inputs, trace = MODELS[name]()
    first, second = make_inputs(2, seed=3), make_inputs(2, seed=4)
    before, _ = trace(model, first)
    k, depth = 1, DEPTH[name]
    states, head = trace(model, second)
    want = head(states[k] + before[depth] - before[k])
    assert not torch.allclose(want, head(states[k]), atol=1e-3)  # the remainder moves the output
    early = enable_early_exit(model, None, StaticDepth([k]), remainder=CachedRemainder(order=0))
    early.progress = 0.0
    torch.testing.assert_close(model(**first).sample, by_hand(trace, model, first, depth), rtol=0, atol=1e-5)
    assert early.last_depths.tolist() == [depth, depth]
    early.progress = 1.0
    torch.testing.assert_close(model(**second).sample, want, rtol=0, atol=1e-5)
    assert early.last_depths.tolist() == [k, k]


@torch.no_grad()
def test_under_flux_true_cfg_each_branch_keeps_its_own_cached_remainder():
    # FluxPipeline with true_cfg_scale > 1 calls the transformer twice a step at one progress: the positive prompt,
    # then the negative. Re-derived per branch on its own: step 0 refreshes every block; at steps 1 and 2 an exit
    # after block k reads h_k plus what blocks k+1..L added to that branch's image tokens at step 0.
    model, make_inputs, trace = flux()
    k, depth = 1, DEPTH["flux-dev"]
    steps = []
    for s in range(3):
        positive = make_inputs(1, seed=10 + s)
        negative = dict(positive, encoder_hidden_states=make_inputs(1, seed=20 + s)["encoder_hidden_states"],
                        pooled_projections=make_inputs(1, seed=30 + s)["pooled_projections"])
        steps.append((positive, negative))
    early = enable_early_exit(model, None, StaticDepth([k]), remainder=CachedRemainder(order=0))
    got = []
    for s, pair in enumerate(steps):
        early.progress = s / 2
        got.append([model(**inp).sample for inp in pair])
    for branch in range(2):
        refreshed, _ = trace(model, steps[0][branch])
        torch.testing.assert_close(got[0][branch], by_hand(trace, model, steps[0][branch], depth), rtol=0, atol=1e-5)
        for s in (1, 2):
            states, head = trace(model, steps[s][branch])
            want = head(states[k] + refreshed[depth] - refreshed[k])
            torch.testing.assert_close(got[s][branch], want, rtol=0, atol=1e-5)
        # The other branch's residuals would give another output: the test tells the slots apart.
        other, _ = trace(model, steps[0][1 - branch])
        states, head = trace(model, steps[1][branch])
        assert not torch.allclose(got[1][branch], head(states[k] + other[depth] - other[k]), atol=1e-3)


@torch.no_grad()
def test_flux_guided_pairs_exit_together():
    # FluxPipeline's true CFG runs the halves as two calls; a batch of [cond; uncond] halves still pairs.
    model, make_inputs, _ = flux()
    inp = make_inputs(2)
    guided = {k: (torch.cat([v, v]) if k not in ("img_ids", "txt_ids") else v) for k, v in inp.items()}
    guided["encoder_hidden_states"][2:] = 0.0
    early = enable_early_exit(model, None, FullDepth())
    model(**guided)
    assert early.last_depths.tolist() == [DUAL + SINGLE] * 2


@torch.no_grad()
def test_what_an_exit_cannot_run_through_is_refused_naming_it():
    model, make_inputs, _ = flux()
    enable_early_exit(model, None, StaticDepth([1]))
    inp = make_inputs(1)
    with pytest.raises(ValueError, match="FluxTransformer2DModel do not support controlnet_block_samples"):
        model(**inp, controlnet_block_samples=[torch.zeros(1, 16, 16)])
    with pytest.raises(ValueError, match=r"LoRA scale in joint_attention_kwargs \(fuse the LoRA first"):
        model(**inp, joint_attention_kwargs={"scale": 0.5})
    model, make_inputs, _ = sana()
    enable_early_exit(model, None, StaticDepth([1]))
    with pytest.raises(ValueError, match=r"LoRA scale in attention_kwargs"):
        model(**make_inputs(1), attention_kwargs={"scale": 0.5})


def test_an_unsupported_transformer_class_is_refused_naming_it_and_the_supported_ones():
    from diffusers import AuraFlowTransformer2DModel

    model = AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                       num_single_dit_layers=1, attention_head_dim=8, num_attention_heads=2,
                                       joint_attention_dim=12, caption_projection_dim=16, out_channels=4,
                                       pos_embed_max_size=16)
    message = (r"early exits support DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel, "
               r"FluxTransformer2DModel, SanaTransformer2DModel; got AuraFlowTransformer2DModel")
    with pytest.raises(ValueError, match=message):
        enable_early_exit(model, None, StaticDepth([1]))
    with pytest.raises(ValueError, match=message):
        UEMStack.for_model(model)
