import os

import pytest


def _import_triton_interpretable():
    """Import triton's language library with the interpreter on.

    ``triton.jit`` decides at decoration time whether a function is compiled or interpreted, so if anything
    (diffusers, torch) imports ``triton.language`` first, its library functions (``tl.zeros``, ``tl.max``...)
    cannot run inside the CPU interpreter that the kernel tests switch on. Importing it here, before any test
    module, with ``TRITON_INTERPRET=1`` and then restoring the variable, keeps both modes usable in one run.
    CPU-only: on a GPU machine run the kernel check script instead (benchmarks/kernels_gpu.py).
    """
    try:
        import torch

        if torch.cuda.is_available():
            return
    except ImportError:
        return
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except ImportError:
        pass
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


_import_triton_interpretable()


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow", action="store_true", default=False,
        help="also run tests marked slow (training runs) and browser (Chromium)",
    )


def pytest_configure(config):
    # Tests run tiny models, whose matmuls only pay for thread hand-offs: one thread is several times faster,
    # and much more so when the other core is busy.
    import torch

    torch.set_num_threads(1)
    config.addinivalue_line("markers", "slow: training runs and long end-to-end checks")
    config.addinivalue_line("markers", "browser: real-browser tests in Chromium driven by Playwright")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow/browser test: run with --run-slow")
    for item in items:
        if "slow" in item.keywords or "browser" in item.keywords:
            item.add_marker(skip)


TINY_VOCAB, TINY_MASK = 40, 39


@pytest.fixture(scope="session")
def tiny_llama():
    """A tiny random bidirectional Llama (vocab 40, mask id 39), the interface of LLaDA-style models."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, is_causal=False,
                      initializer_range=0.5)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    # A trained model never predicts the mask token. A zero row gives it logit 0, below the largest of the 39
    # random logits, so spans end fully decoded.
    with torch.no_grad():
        model.lm_head.weight[TINY_MASK] = 0.0
    return model


def make_tiny_dit(*, layers=4, seed=0, sample_size=8, heads=2, head_dim=8, in_channels=1, out_channels=None,
                  classes=1000):
    """A tiny random class-conditional ``DiTTransformer2DModel`` (patch 2) in eval mode, seeded.

    ``out_channels=2 * in_channels`` gives the learned-sigma layout of every public DiT checkpoint.
    """
    import torch
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_channels,
                                 out_channels=out_channels, num_layers=layers, sample_size=sample_size, patch_size=2,
                                 num_embeds_ada_norm=classes).eval()


@pytest.fixture(scope="session")
def tiny_dit():
    """The factory :func:`make_tiny_dit`: every test builds its tiny DiT the same way."""
    return make_tiny_dit


def save_learned_sigma_folders(root, classes=1000):
    """Under ``root``: ``pipe/``, a ``DiTPipeline`` with the layout of every public DiT checkpoint (a tiny VAE, a
    3-block transformer with learned sigma, ``classes`` labels, the null class last), and ``images/``, an
    ImageFolder of 3 classes x 4 random 8x8 RGB images. Returns ``root``."""
    from pathlib import Path

    import numpy as np
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline
    from PIL import Image

    root = Path(root)
    transformer = make_tiny_dit(layers=3, in_channels=4, out_channels=8, classes=classes)
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=8).eval()
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler()).save_pretrained(root / "pipe")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / "images" / f"class{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray((rng.random((8, 8, 3)) * 255).astype("uint8")).save(root / "images" / f"class{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def learned_sigma_folders():
    """The factory :func:`save_learned_sigma_folders`."""
    return save_learned_sigma_folders


def make_tiny_text_model(*, layers=2, heads=2, max_positions=64, seed=0, initializer_range=None,
                         never_predict_mask=False, cls=None):
    """``(model, tokenizer)``: a tiny random model in the embedded text model's format (``DiffusionLlama`` over the
    character tokenizer, width 32), seeded, in eval mode; ``cls`` swaps in another class taking the same config
    (``LlamaForCausalLM``).

    ``never_predict_mask`` zeroes the mask token's output row, as a trained model never predicts ``[MASK]``.
    """
    import torch

    from diffexit.dllm.charlm.model import DiffusionLlama, text_model_config
    from diffexit.dllm.charlm.tokenizer import build_tokenizer

    tok = build_tokenizer()
    config = text_model_config(len(tok), tok.pad_token_id, hidden_size=32, num_layers=layers, num_heads=heads,
                               max_positions=max_positions)
    if initializer_range is not None:
        config.initializer_range = initializer_range
    torch.manual_seed(seed)
    model = (cls or DiffusionLlama)(config).eval()
    if never_predict_mask:
        with torch.no_grad():
            model.lm_head.weight[tok.mask_token_id] = 0.0
    return model, tok


@pytest.fixture(scope="session")
def tiny_text_model():
    """The factory :func:`make_tiny_text_model`."""
    return make_tiny_text_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread for each test module, the count before it restored after it.

    ``pytest_configure`` sets one thread for the session; commands under test that take ``--threads`` set their own,
    and without this the next modules would run with it: tiny models on shared cores, where OpenMP threads spin
    against each other and run 10-40x slower.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_perturbed_dit(*, seed=0, layers=4):
    """:func:`make_tiny_dit` with every weight moved by ``N(0, 0.05^2)`` noise (drawn right after its seeded init).

    adaLN-zero starts each block as the identity, so a freshly built DiT's blocks change nothing; the noise gives
    every block a residual of its own.
    """
    import torch

    m = make_tiny_dit(layers=layers, seed=seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.fixture(scope="session")
def perturbed_dit():
    """The factory :func:`make_perturbed_dit`."""
    return make_perturbed_dit


def make_spread_uem(model, *, seed=1, target="paper"):
    """Random UEM heads for ``model`` (seeded) whose mean uncertainty differs clearly between samples and blocks:
    weights ``N(0, 1 / hidden_size)``, so each head's logit is of order one rather than near zero."""
    import torch

    from diffexit.uem import UEMStack

    torch.manual_seed(seed)
    uem = UEMStack.for_model(model, target=target)
    d = uem.config.hidden_size
    with torch.no_grad():
        uem.token_weight.copy_(torch.randn_like(uem.token_weight) / d**0.5)
        uem.cond_weight.copy_(torch.randn_like(uem.cond_weight) / d**0.5)
    return uem


@pytest.fixture(scope="session")
def spread_uem():
    """The factory :func:`make_spread_uem`."""
    return make_spread_uem


class CallRecorder:
    """A text model that keeps every call's input ids ``[B, L]``, keyword arguments and logits ``[B, L, V]`` in
    ``calls`` (one ``SimpleNamespace(ids, kwargs, logits)`` per forward)."""

    def __init__(self, model):
        self.model, self.config, self.calls = model, model.config, []
        self.forward = model.forward  # its signature says which cache keyword it takes

    def __call__(self, input_ids, **kwargs):
        from types import SimpleNamespace

        out = self.model(input_ids, **kwargs)
        self.calls.append(SimpleNamespace(ids=input_ids.clone(), kwargs=kwargs, logits=out.logits.clone()))
        return out


@pytest.fixture(scope="session")
def recorder():
    """The class :class:`CallRecorder`: ``recorder(model)`` wraps a model."""
    return CallRecorder


def make_sharp_gemma(tok, canvas_length):
    """A tiny random ``DiffusionGemmaForBlockDiffusion`` (``gemma_config`` over ``tok``), seeded, in eval mode, with
    its final encoder norm scaled by 30.

    A random model's predictions are near uniform and never settle; the sharper norm makes it sure enough that
    stopping rules stop samples part-way, at different steps.
    """
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    from diffexit.dllm.charlm.gemma import gemma_config

    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(gemma_config(tok, canvas_length=canvas_length)).eval()
    with torch.no_grad():
        model.model.encoder.language_model.norm.weight.mul_(30)
    return model


@pytest.fixture(scope="session")
def sharp_gemma():
    """The factory :func:`make_sharp_gemma`."""
    return make_sharp_gemma
