"""Early exits on tiny random PixArt and SD3 transformers: each model's own head, compaction, guided pairs."""

import pytest
import torch
from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel

from diffexit.uem import FullDepth, StaticDepth, UEMStack, enable_early_exit, exit_predictions

LAYERS = 3


def unpatchify(h, side, p, c):
    n = side // p
    return torch.einsum("nhwpqc->nchpwq", h.reshape(-1, n, n, p, p, c)).reshape(-1, c, side, side)


def pixart():
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=LAYERS,
        sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=12, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, use_additional_conditions=False, norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()

    def make_inputs(batch, seed=3):
        g = torch.Generator().manual_seed(seed)
        mask = torch.ones(batch, 5, dtype=torch.long)
        mask[0, 3:] = 0
        return {
            "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, 12, generator=g),
            "timestep": torch.randint(0, 1000, (batch,), generator=g),
            "encoder_attention_mask": mask,
        }

    def by_hand(m, inp, k):
        x, b = inp["hidden_states"], inp["hidden_states"].shape[0]
        bias = ((1 - inp["encoder_attention_mask"].float()) * -10000.0).unsqueeze(1)
        h = m.pos_embed(x)
        t6, emb = m.adaln_single(inp["timestep"], None, batch_size=b, hidden_dtype=h.dtype)
        text = m.caption_projection(inp["encoder_hidden_states"]).view(b, -1, h.shape[-1])
        for block in m.transformer_blocks[:k]:
            h = block(h, encoder_hidden_states=text, encoder_attention_mask=bias, timestep=t6)
        shift, scale = (m.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)
        h = m.proj_out(m.norm_out(h) * (1 + scale) + shift)
        return unpatchify(h, x.shape[-1], m.config.patch_size, m.out_channels)

    return model, make_inputs, by_hand


def sd3():
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=LAYERS, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
        pos_embed_max_size=16,
    ).eval()

    def make_inputs(batch, seed=3):
        g = torch.Generator().manual_seed(seed)
        return {
            "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, 12, generator=g),
            "pooled_projections": torch.randn(batch, 10, generator=g),
            "timestep": torch.randint(0, 1000, (batch,), generator=g),
        }

    def by_hand(m, inp, k):
        x = inp["hidden_states"]
        h = m.pos_embed(x)
        temb = m.time_text_embed(inp["timestep"], inp["pooled_projections"])
        text = m.context_embedder(inp["encoder_hidden_states"])
        for block in m.transformer_blocks[:k]:
            text, h = block(hidden_states=h, encoder_hidden_states=text, temb=temb)
        h = m.proj_out(m.norm_out(h, temb))
        return unpatchify(h, x.shape[-1], m.config.patch_size, m.out_channels)

    return model, make_inputs, by_hand


MODELS = {"pixart": pixart, "sd3": sd3}


def expected_depths(mean_u, tau):
    """First block (1-based) whose mean uncertainty is below tau, per column of mean_u [L, G]; L if none."""
    below = mean_u[:-1] < tau
    return torch.where(below.any(0), below.int().argmax(0) + 1, mean_u.shape[0]).long()


def spreading_tau(mean_u):
    """A threshold half-way between two observed values that gives the most distinct exit depths."""
    v = mean_u[:-1].flatten().sort().values
    candidates = [float((a + b) / 2) for a, b in zip(v[:-1], v[1:])]
    return max(candidates, key=lambda tau: len(set(expected_depths(mean_u, tau).tolist())))


def rows(inp, index):
    return {k: v[index] for k, v in inp.items()}


@torch.no_grad()
@pytest.mark.parametrize("name", MODELS)
def test_threshold_that_never_fires_equals_original_forward(name, spread_uem):
    model, make_inputs, _ = MODELS[name]()
    inp = make_inputs(3)
    ref = model(**inp).sample
    early = enable_early_exit(model, spread_uem(model), 0.0)
    torch.testing.assert_close(model(**inp).sample, ref, rtol=0, atol=1e-6)
    assert early.last_depths.tolist() == [LAYERS] * 3


@torch.no_grad()
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("k", range(1, LAYERS + 1))
def test_exit_after_block_k_is_prefix_plus_own_head(name, k):
    model, make_inputs, by_hand = MODELS[name]()
    inp = make_inputs(3)
    want = by_hand(model, inp, k)
    if k == LAYERS:
        torch.testing.assert_close(want, model(**inp).sample, rtol=0, atol=1e-5)
    early = enable_early_exit(model, None, StaticDepth([k]))
    torch.testing.assert_close(model(**inp).sample, want, rtol=0, atol=1e-5)
    assert early.last_depths.tolist() == [k] * 3


@torch.no_grad()
@pytest.mark.parametrize("name", MODELS)
def test_compacted_batch_equals_each_sample_run_alone(name, spread_uem):
    model, make_inputs, by_hand = MODELS[name]()
    uem = spread_uem(model)
    inp = make_inputs(4)
    mean_u = exit_predictions(model, uem, **inp).uncertainty.mean(-1)
    tau = spreading_tau(mean_u)
    want = expected_depths(mean_u, tau)
    assert len(set(want.tolist())) >= 2, "the check needs samples that exit at different blocks"
    early = enable_early_exit(model, uem, tau, cfg=False)
    batched = model(**inp).sample
    assert early.last_depths.tolist() == want.tolist()
    for i in range(4):
        one = rows(inp, slice(i, i + 1))
        alone = model(**one).sample
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(alone, by_hand(model, one, int(want[i])), rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("name", MODELS)
def test_guided_batch_exits_in_pairs(name):
    model, make_inputs, _ = MODELS[name]()
    inp = make_inputs(2)
    guided = {k: torch.cat([v, v]) for k, v in inp.items()}
    guided["encoder_hidden_states"][2:] = 0.0  # the unconditional half: an empty caption
    early = enable_early_exit(model, None, FullDepth())
    model(**guided)
    assert early.last_depths.tolist() == [LAYERS, LAYERS]  # two samples, not four rows


def test_sd3_refuses_what_it_cannot_exit_through():
    # A rule that can exit: at full depth the model's own forward runs, and it takes these arguments itself.
    model, make_inputs, _ = sd3()
    enable_early_exit(model, None, StaticDepth([1]))
    inp = make_inputs(1)
    with pytest.raises(ValueError, match="skip_layers"):
        model(**inp, skip_layers=[1])
    with pytest.raises(ValueError, match="LoRA scale"):
        model(**inp, joint_attention_kwargs={"scale": 0.5})


def test_a_model_without_an_adapter_is_refused_with_the_supported_ones():
    with pytest.raises(ValueError, match="support DiTTransformer2DModel, PixArtTransformer2DModel, "
                                         "SD3Transformer2DModel, FluxTransformer2DModel, SanaTransformer2DModel; "
                                         "got Linear"):
        UEMStack.for_model(torch.nn.Linear(2, 2))
