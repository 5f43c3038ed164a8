"""The embedded image models: digits data, the classifier and its measures, the shipped DiT, its trainer."""

import json
import shutil

import numpy as np
import pytest
import torch

from diffexit.uem.digits.classifier import (
    DigitsClassifier,
    class_agreement,
    extract_features,
    frechet_distance,
    test_accuracy as held_out_accuracy,
)
from diffexit.uem.digits.data import load_digits_dataset, split_indices
from diffexit.uem.digits.embedded import load_embedded_classifier, load_embedded_pipeline
from diffexit.uem.digits.pipeline import DigitsDiTPipeline
from diffexit.common.training import EMA
from diffexit.uem.digits.model import build_noise_scheduler, build_transformer
from diffexit.uem.digits.train import EMA_MAX_DECAY, _schedule_totals, checkpoints, epsilon_loss, export_pipeline
from diffexit.uem.digits.train import main as train_main

# The shipped classifier must read at least this share of the 300 held-out real digits correctly.
CLASSIFIER_ACCURACY_BAR = 0.97
TINY = ["--num-layers", "2", "--num-heads", "2", "--head-dim", "16", "--batch-size", "16", "--lr", "1e-3",
        "--log-every", "5"]


# --- data ---------------------------------------------------------------------------------------------

def test_digits_shapes_ranges_and_splits():
    train, test, everything = (load_digits_dataset(16, s).tensors for s in ("train", "test", "all"))
    assert train[0].shape == (1497, 1, 16, 16) and test[0].shape == (300, 1, 16, 16)
    assert everything[0].shape == (1797, 1, 16, 16)
    for images, labels in (train, test, everything):
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert images.min() >= -1 and images.max() <= 1
        assert set(labels.tolist()) == set(range(10))
    # The two splits are disjoint, together are the whole set, and hold exactly those images.
    train_ids, test_ids = split_indices("train", 1797), split_indices("test", 1797)
    assert not set(train_ids.tolist()) & set(test_ids.tolist())
    assert sorted(train_ids.tolist() + test_ids.tolist()) == list(range(1797))
    assert torch.equal(train[0], everything[0][train_ids]) and torch.equal(test[1], everything[1][test_ids])


def test_digits_are_deterministic_and_native_size_is_the_source():
    from sklearn.datasets import load_digits

    a, b = load_digits_dataset(16, "test").tensors, load_digits_dataset(16, "test").tensors
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    native, labels = load_digits_dataset(8, "all").tensors
    source = load_digits()
    assert torch.allclose(native[:, 0], torch.from_numpy(source.images).float() / 8.0 - 1.0)
    assert torch.equal(labels, torch.from_numpy(source.target))
    assert load_digits_dataset(32, "train").tensors[0].shape == (1497, 1, 32, 32)


@pytest.mark.parametrize("kwargs", [{"split": "valid"}, {"image_size": 4}, {"image_size": 16.0}])
def test_digits_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="split|image_size"):
        load_digits_dataset(**kwargs)


# --- classifier and measures ----------------------------------------------------------------------------

def test_shipped_classifier_accuracy_above_bar():
    assert held_out_accuracy(load_embedded_classifier()) >= CLASSIFIER_ACCURACY_BAR


def test_class_agreement_counts_matches_and_rejects_bad_input():
    classifier = load_embedded_classifier()
    images, labels = load_digits_dataset(16, "test").tensors
    images = (images[:40] + 1) / 2
    predicted = classifier(images).argmax(-1)
    wrong = (predicted + 1) % 10
    assert class_agreement(images, predicted, classifier) == 1.0
    assert class_agreement(images, wrong, classifier) == 0.0
    half = torch.cat([predicted[:20], wrong[20:]])
    assert class_agreement(images, half, classifier) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        class_agreement(images * 2 - 1, predicted, classifier)
    with pytest.raises(ValueError, match="one label per image"):
        class_agreement(images, predicted[:3], classifier)
    with pytest.raises(ValueError, match=r"\[N, 1, 16, 16\]"):
        class_agreement(images[:, :, :8, :8], predicted, classifier)


def test_frechet_distance_identity_shift_and_reference():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(size=(300, 8)) * 1.5 + 0.2
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # A pure shift of the mean moves the distance by exactly |shift|^2.
    shift = np.arange(8) * 0.1
    assert frechet_distance(a, a + shift) == pytest.approx(float((shift**2).sum()), rel=1e-6)
    # Against scipy's sqrtm of the non-symmetric product, on full-rank covariances where it is well defined.
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb) - 2 * np.trace(linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-6)
    # Rank-deficient covariances (fewer samples than features) still give a finite, non-negative number.
    assert np.isfinite(frechet_distance(a[:5], b[:4])) and frechet_distance(a[:5], b[:4]) >= 0
    with pytest.raises(ValueError, match="same F"):
        frechet_distance(a, b[:, :4])
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], b)


def test_classifier_features_shape_and_real_digits_are_closer_than_noise():
    classifier = load_embedded_classifier()
    real, _ = load_digits_dataset(16, "test").tensors
    other, _ = load_digits_dataset(16, "train").tensors
    features = extract_features(classifier, (real + 1) / 2)
    assert features.shape == (300, 64) and features.dtype == torch.float32
    noise = torch.rand(300, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    to_real = frechet_distance(extract_features(classifier, (other[:300] + 1) / 2), features)
    assert to_real < frechet_distance(extract_features(classifier, noise), features)


# --- shipped pipeline ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    pipeline = load_embedded_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_shipped_pipeline_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipeline = load_embedded_pipeline()
    config = pipeline.transformer.config
    assert isinstance(pipeline, DigitsDiTPipeline)
    assert config.num_layers >= 12 and config.num_embeds_ada_norm == 1000
    assert config.in_channels == config.out_channels == 1 and config.sample_size == 16
    assert pipeline.transformer.dtype == torch.float32
    from diffusers.models.embeddings import LabelEmbedding

    assert all(m.dropout_prob == 0 for m in pipeline.transformer.modules() if isinstance(m, LabelEmbedding))


@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_shipped_pipeline_shapes_and_determinism(pipe, guidance_scale):
    def run(seed, output_type="pt"):
        return pipe([3, 7], guidance_scale=guidance_scale, num_inference_steps=3,
                    generator=torch.Generator().manual_seed(seed), output_type=output_type).images

    first, again, other = run(0), run(0), run(1)
    assert first.shape == (2, 1, 16, 16) and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    as_np = run(0, "np")
    assert as_np.shape == (2, 16, 16, 1) and np.allclose(as_np, first.permute(0, 2, 3, 1).numpy())
    as_pil = run(0, "pil")
    assert len(as_pil) == 2 and as_pil[0].size == (16, 16) and as_pil[0].mode == "L"


def _oracle_denoiser(targets):
    """A stand-in transformer that returns the exact noise separating x_t from ``targets[label]``; a null-class
    row (second half of a guided batch) points to the same image as its conditional row."""
    from types import SimpleNamespace

    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    class Oracle(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, sample_size: int = 16, in_channels: int = 1, num_embeds_ada_norm: int = 1000):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a dtype and a device
            self.labels_seen = []

        def forward(self, x, timestep, class_labels):
            self.labels_seen.append(class_labels.tolist())
            labels = torch.where(class_labels == 1000, class_labels.roll(len(class_labels) // 2), class_labels)
            alpha = build_noise_scheduler().alphas_cumprod[timestep].view(-1, 1, 1, 1)
            return SimpleNamespace(sample=(x - alpha.sqrt() * targets[labels]) / (1 - alpha).sqrt())

    return Oracle()


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_pipeline_loop_recovers_the_image_an_exact_denoiser_points_to(guidance_scale):
    from diffexit.uem.digits.model import build_sampling_scheduler

    digits, _ = load_digits_dataset(16, "test").tensors
    oracle = _oracle_denoiser(digits[:10])
    pipe = DigitsDiTPipeline(transformer=oracle, scheduler=build_sampling_scheduler())
    pipe.set_progress_bar_config(disable=True)
    images = pipe([2, 7], guidance_scale=guidance_scale, num_inference_steps=10,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.allclose(images * 2 - 1, digits[[2, 7]], atol=1e-5)
    # Guidance stacks [cond; uncond] with the null class 1000, as DiTPipeline does.
    assert oracle.labels_seen[0] == ([2, 7, 1000, 1000] if guidance_scale > 1 else [2, 7])


def test_pipeline_rejects_bad_arguments(pipe):
    with pytest.raises(ValueError, match="digits in 0..9"):
        pipe([10], num_inference_steps=1)
    with pytest.raises(ValueError, match="empty"):
        pipe([], num_inference_steps=1)
    with pytest.raises(ValueError, match="output_type"):
        pipe([1], num_inference_steps=1, output_type="latent")


def test_shipped_cards_state_their_figures():
    from diffexit.uem.digits.files import CLASSIFIER_DIR, DIT_DIR

    dit_card = (DIT_DIR / "MODEL_CARD.md").read_text()
    assert "diffexit train image" in dit_card and "class agreement" in dit_card and "Seed" in dit_card
    assert "Held-out accuracy" in (CLASSIFIER_DIR / "MODEL_CARD.md").read_text()


# --- trainer -------------------------------------------------------------------------------------------

def _run(tmp_path, name, *extra):
    out = tmp_path / name
    assert train_main(["--out", str(out), *TINY, *extra]) == 0
    return out


def _weights(checkpoint):
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model.safetensors"))


def test_new_transformer_is_adaln_zero_and_drops_no_labels():
    from diffusers.models.embeddings import LabelEmbedding

    model = build_transformer(16, 2, 2, 16)
    assert all(block.norm1.linear.weight.abs().sum() == 0 for block in model.transformer_blocks)
    assert model.proj_out_2.weight.abs().sum() == 0
    assert all(m.dropout_prob == 0 for m in model.modules() if isinstance(m, LabelEmbedding))
    x = torch.randn(2, 1, 16, 16)
    out = model.train()(x, timestep=torch.tensor([5, 900]), class_labels=torch.tensor([1, 1000])).sample
    assert out.shape == x.shape and torch.all(out == 0)


def test_training_lowers_the_loss_and_resume_is_exact(tmp_path):
    out = _run(tmp_path, "run", "--steps", "40", "--checkpoint-every", "20")
    assert [p.name for p in checkpoints(out)] == ["step-000020", "step-000040"]

    # Fixed-noise loss on held-out digits: the initial model (same seed) against the trained one.
    images, labels = load_digits_dataset(16, "test").tensors
    scheduler = build_noise_scheduler()
    torch.manual_seed(0)
    model = build_transformer(16, 2, 2, 16)

    def held_out_loss():
        with torch.no_grad():
            return epsilon_loss(model, scheduler, images, labels, torch.Generator().manual_seed(1), 0.0).item()

    before = held_out_loss()
    model.load_state_dict(_weights(checkpoints(out)[-1]))
    assert held_out_loss() < before * 0.9

    # Resume from step 20 and reach step 40 again: same weights, EMA and log as the uninterrupted run.
    uninterrupted = _weights(checkpoints(out)[-1])
    ema_state = torch.load(checkpoints(out)[-1] / "custom_checkpoint_0.pkl", weights_only=False)
    log = (out / "log.jsonl").read_text().splitlines()
    shutil.rmtree(checkpoints(out)[-1])
    assert train_main(["--out", str(out), *TINY, "--steps", "40", "--checkpoint-every", "20", "--resume"]) == 0
    resumed = _weights(checkpoints(out)[-1])
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    resumed_ema = torch.load(checkpoints(out)[-1] / "custom_checkpoint_0.pkl", weights_only=False)
    assert resumed_ema["updates"] == ema_state["updates"] == 40
    assert all(torch.equal(ema_state["shadow"][k], resumed_ema["shadow"][k]) for k in ema_state["shadow"])
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in log] == [5, 10, 15, 20, 25, 30, 35, 40]


def test_extended_run_records_its_commands_and_resumes_exactly(tmp_path):
    out = _run(tmp_path, "run", "--steps", "20", "--checkpoint-every", "10")
    assert train_main(["--out", str(out), *TINY, "--steps", "30", "--checkpoint-every", "10", "--resume"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["steps"] == 30
    assert [(e["from_step"], e["previous_steps"], e["steps"]) for e in run["extensions"]] == [(20, 20, 30)]
    lrs = {json.loads(line)["step"]: json.loads(line)["lr"] for line in (out / "log.jsonl").read_text().splitlines()}
    first = _weights(checkpoints(out)[-1])
    # Resuming the extended run from step 20 retraces it.
    shutil.rmtree(checkpoints(out)[-1])
    assert train_main(["--out", str(out), *TINY, "--steps", "30", "--checkpoint-every", "10", "--resume"]) == 0
    again = _weights(checkpoints(out)[-1])
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert lrs == {json.loads(line)["step"]: json.loads(line)["lr"]
                   for line in (out / "log.jsonl").read_text().splitlines()}
    # Steps before the extension keep the schedule length they were trained under.
    totals = _schedule_totals(run)
    assert [totals(step) for step in (0, 19, 20, 29)] == [20, 20, 30, 30]


def test_trainer_refuses_to_mix_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_main(["--out", str(tmp_path / "none"), *TINY, "--steps", "2", "--resume"])
    assert "no checkpoint" in capsys.readouterr().err
    out = _run(tmp_path, "run", "--steps", "2")
    with pytest.raises(SystemExit):
        train_main(["--out", str(out), *TINY, "--steps", "2"])
    assert "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main(["--out", str(out), *TINY, "--steps", "2", "--lr", "5e-4", "--resume"])
    assert "'lr': (0.001, 0.0005)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main(["--out", str(out), *TINY, "--steps", "1", "--resume"])
    assert "can only be extended" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main(["--out", str(out), *TINY, "--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_export_writes_a_loadable_fp16_pipeline(tmp_path):
    from diffexit.uem.digits.model import build_sampling_scheduler

    torch.manual_seed(0)
    model = build_transformer(16, 2, 2, 16)
    ema = EMA(model, EMA_MAX_DECAY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the export must ship the EMA, not the live weights
    directory = export_pipeline(model, ema, tmp_path / "dit")
    from safetensors.torch import load_file

    stored = load_file(str(directory / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.float16}
    loaded = DigitsDiTPipeline.from_pretrained(str(directory), dtype=torch.float32)
    assert loaded.scheduler.config.timestep_spacing == build_sampling_scheduler().config.timestep_spacing
    for name, p in loaded.transformer.named_parameters():
        assert torch.equal(p, ema.shadow[name].half().float())
    loaded.set_progress_bar_config(disable=True)
    images = loaded([0, 5, 9], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (3, 1, 16, 16)


@pytest.mark.slow  # 80 sampling runs of 25 steps
def test_shipped_exit_trained_model_matches_its_card(monkeypatch):
    """The exit-trained backbone loads offline and gives its card's class agreement on 20 seeded digits: the same
    as the original at full depth, far above it at depth 6 (what exit training is for)."""
    from diffexit.samplers import ExitAwareScheduler
    from diffexit.uem import StaticDepth, enable_early_exit
    from diffexit.uem.digits.card import sample_digits
    from diffexit.uem.digits.files import EXITS_DIR

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    card = (EXITS_DIR / "MODEL_CARD.md").read_text()
    assert "| exit-trained (this folder) | 0.85 | 0.75 |" in card and "| original `dit-digits` | 0.85 | 0.50 |" in card
    classifier = load_embedded_classifier()
    measured = {}
    for exit_trained in (False, True):
        pipe = load_embedded_pipeline(exit_trained=exit_trained)
        pipe.set_progress_bar_config(disable=True)
        measured[exit_trained, 12] = class_agreement(*sample_digits(pipe, 2, 2.0, 25, 0), classifier)
        pipe.scheduler = ExitAwareScheduler(pipe.scheduler, enable_early_exit(pipe, None, StaticDepth([6])))
        measured[exit_trained, 6] = class_agreement(*sample_digits(pipe, 2, 2.0, 25, 0), classifier)
    # One digit of slack (0.05) for float differences between CPUs; the two backbones differ by five at depth 6.
    card_figures = {(False, 12): 0.85, (False, 6): 0.50, (True, 12): 0.85, (True, 6): 0.75}
    assert all(abs(measured[key] - value) <= 0.05 + 1e-6 for key, value in card_figures.items()), measured
