"""A small CNN that recognises the 16x16 digits, and the two quality measures built on it.

The image benchmark asks of a generated digit: is it the class that was requested
(:func:`class_agreement`), and do the samples, as a set, look like the real digits (:func:`frechet_distance`
on the classifier's penultimate features, the way FID uses Inception's)? The classifier is trained with
random affine warps, blur, contrast changes and noise, so that slightly imperfect generated digits are still
judged by their shape rather than rejected for their texture.

Images in this module are ``[N, 1, 16, 16]`` float tensors in [0, 1], as pipelines return them with
``output_type="pt"``; :func:`load_digits_dataset` images (in [-1, 1]) map there by ``(x + 1) / 2``.

Train and export the shipped weights with
``python -m diffexit.uem.digits.classifier --export uem/digits/weights/classifier``.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...common.cli_help import HelpFormatter
from ...common.model_card import model_card, write_model_card
from .data import NUM_CLASSES, load_digits_dataset
from .files import CLASSIFIER_DIR

IMAGE_SIZE = 16
FEATURE_DIM = 64
WEIGHTS_NAME = "classifier.safetensors"
# Inputs below this are taken for [-1, 1] images passed by mistake; a real [0, 1] image never goes there.
RANGE_SLACK = 0.05


class DigitsClassifier(nn.Module):
    """Two conv stages (16 -> 8 -> 4 pixels), a 64-d feature layer and a 10-way linear head (~135k params).

    It has no batch norm and no dropout, so train and eval mode compute the same function.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),
        )
        self.project = nn.Linear(64 * (IMAGE_SIZE // 4) ** 2, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[N, 64]`` of images ``[N, 1, 16, 16]`` in [0, 1]."""
        _check_images(images)
        hidden = self.conv(images.to(self.head.weight.dtype) * 2.0 - 1.0)
        return F.gelu(self.project(hidden.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, 10]`` of images ``[N, 1, 16, 16]`` in [0, 1]."""
        return self.head(self.features(images))


def _check_images(images: torch.Tensor) -> None:
    if not torch.is_tensor(images) or images.ndim != 4 or tuple(images.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(
            f"the digits classifier takes a tensor [N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}], got {shape}; "
            f"generate with output_type='pt' at sample size {IMAGE_SIZE}"
        )
    if images.numel() and float(images.min()) < -RANGE_SLACK:
        raise ValueError(
            f"the digits classifier takes images in [0, 1], got a minimum of {float(images.min()):.3f}; "
            "images in [-1, 1] (model space, load_digits_dataset) map there by (x + 1) / 2"
        )


@torch.no_grad()
def predict(classifier: DigitsClassifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted classes (int64 ``[N]``) of images ``[N, 1, 16, 16]`` in [0, 1]."""
    _check_images(images)
    return torch.cat([classifier(chunk).argmax(-1) for chunk in images.split(batch_size)])


@torch.no_grad()
def extract_features(classifier: DigitsClassifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Penultimate features (float32 ``[N, 64]``) of images ``[N, 1, 16, 16]`` in [0, 1]."""
    _check_images(images)
    return torch.cat([classifier.features(chunk).float() for chunk in images.split(batch_size)])


def class_agreement(
    images: torch.Tensor, labels: torch.Tensor | Sequence[int], classifier: Optional[DigitsClassifier] = None
) -> float:
    """Fraction in [0, 1] of ``images`` that the classifier reads as their requested ``labels``.

    Args:
        images: ``[N, 1, 16, 16]`` in [0, 1].
        labels: the requested classes, ``N`` ints in 0..9.
        classifier: defaults to the shipped one (``uem/digits/weights/classifier``).
    """
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if len(labels) != len(images) or len(labels) == 0:
        raise ValueError(f"class_agreement needs one label per image and at least one image, "
                         f"got {len(images)} images and {len(labels)} labels")
    if classifier is None:
        classifier = load_classifier(CLASSIFIER_DIR)
    return (predict(classifier, images).cpu() == labels.cpu()).float().mean().item()


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[N_a, F]`` and ``[N_b, F]``.

    ``|mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a^1/2 C_b C_a^1/2)^1/2)``, in float64. The cross
    term uses the symmetric product, whose square root an eigendecomposition gives exactly; the usual
    ``sqrtm(C_a C_b)`` of a non-symmetric product goes complex when the covariances are rank deficient,
    as they are when N is below F. Rounding can leave a result of about -1e-12 for identical sets; it
    is clipped to 0.
    """
    a, b = (np.asarray(f.detach().cpu() if torch.is_tensor(f) else f, dtype=np.float64) for f in (feats_a, feats_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance needs two [N, F] feature arrays with the same F, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance needs at least 2 samples per set to fit a covariance, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _psd_sqrt(cov_a)
    cross = _psd_sqrt(root_a @ cov_b @ root_a)
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(cross))
    return max(value, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix; eigenvalues below 0 (rounding) count as 0."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random rotation (+-12 deg), scale (0.85-1.1), shift (+-1.5 px), shear, blur, contrast and noise.

    ``images``: ``[N, 1, 16, 16]`` in [0, 1]; returns the same shape, clamped to [0, 1].
    """
    n = len(images)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    angle = uniform(-12.0, 12.0) * math.pi / 180.0
    scale = uniform(0.85, 1.1)
    shear = uniform(-0.15, 0.15)
    shift = (torch.rand(n, 2, generator=generator) * 2.0 - 1.0) * (1.5 * 2.0 / IMAGE_SIZE)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin + shear, shift[:, 0]], -1), torch.stack([sin, cos, shift[:, 1]], -1)], 1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # Half the batch is blurred by a 3x3 kernel of random strength: generated digits are often softer.
    strength = uniform(0.0, 0.6) * (torch.rand(n, generator=generator) < 0.5)
    blurred = F.avg_pool2d(out, 3, stride=1, padding=1, count_include_pad=False)
    out = out + strength.view(-1, 1, 1, 1) * (blurred - out)
    out = out * uniform(0.7, 1.15).view(-1, 1, 1, 1)
    out = out + uniform(0.0, 0.08).view(-1, 1, 1, 1) * torch.randn(out.shape, generator=generator)
    return out.clamp(0.0, 1.0)


def train_classifier(
    epochs: int = 60, batch_size: int = 64, lr: float = 2e-3, seed: int = 0, log_every: int = 10
) -> DigitsClassifier:
    """Train on the "train" split of the 16x16 digits with :func:`augment`; AdamW, cosine learning rate.

    Deterministic for a given seed on a given machine. Prints the test-split accuracy every ``log_every`` epochs.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_digits_dataset(IMAGE_SIZE, "train").tensors
    images = (images + 1.0) / 2.0
    model = DigitsClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for batch in order.split(batch_size):
            loss = F.cross_entropy(model(augment(images[batch], generator)), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if (epoch + 1) % log_every == 0 or epoch + 1 == epochs:
            print(f"epoch {epoch + 1}/{epochs}  loss {loss.item():.4f}  test accuracy {test_accuracy(model):.4f}")
    return model


def test_accuracy(classifier: DigitsClassifier) -> float:
    """Accuracy in [0, 1] on the 300 held-out "test" digits."""
    images, labels = load_digits_dataset(IMAGE_SIZE, "test").tensors
    return class_agreement((images + 1.0) / 2.0, labels, classifier)


def save_classifier(classifier: DigitsClassifier, directory: str | Path) -> Path:
    """Write the weights (float32 safetensors) to ``directory/classifier.safetensors``; returns that path."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / WEIGHTS_NAME
    save_file({k: v.detach().float().contiguous() for k, v in classifier.state_dict().items()}, str(path))
    return path


def load_classifier(directory: str | Path, device: str | torch.device = "cpu") -> DigitsClassifier:
    """Load weights written by :func:`save_classifier`; raises FileNotFoundError naming the command that makes them."""
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no digits classifier weights at {path}; make them with "
            f"`python -m diffexit.uem.digits.classifier --export {Path(directory)}`"
        )
    classifier = DigitsClassifier()
    classifier.load_state_dict(load_file(str(path)))
    return classifier.to(device).eval().requires_grad_(False)


def _card(command: str, seed: int, epochs: int, seconds: float, accuracy: float) -> str:
    params = sum(p.numel() for p in DigitsClassifier().parameters())
    return model_card(
        "Digits classifier (quality yardstick for the embedded DiT)",
        f"""A small CNN ({params:,} parameters, float32 safetensors) that reads 16x16 digits in [0, 1]. The image
benchmark uses it for class agreement (is a generated digit the requested one?) and for a Frechet distance
on its {FEATURE_DIM}-d penultimate features (`diffexit.uem.digits.classifier`).""",
        {
            "Data": """`sklearn.datasets.load_digits` (1797 images, 8x8, 0..16), bilinearly upsampled to 16x16
  (`diffexit.uem.digits.data.load_digits_dataset`). Trained on the fixed "train" split (1497 images);
  the 300-image "test" split is held out.""",
            "Training": f"""{epochs} epochs, batch 64, AdamW (lr 2e-3 one-cycle, weight decay 1e-4), random rotation,
  scale, shift, shear, blur, contrast and noise on every batch. Seed {seed}. {seconds:.0f} s on CPU
  (1 thread, shared 2-core machine).""",
            "Command": f"`{command}`",
            "Held-out accuracy": f"on the 300 test digits: **{accuracy * 100:.2f}%**.",
        },
    )


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m diffexit.uem.digits.classifier") -> int:
    parser = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter, description="Train the digits classifier that judges generated digits.")
    parser.add_argument("--export", required=True, metavar="DIR",
                        help="write classifier.safetensors and MODEL_CARD.md here (shipped: uem/digits/weights/classifier)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    classifier = train_classifier(epochs=args.epochs, seed=args.seed)
    seconds = time.perf_counter() - start
    accuracy = test_accuracy(classifier)
    path = save_classifier(classifier, args.export)
    command = " ".join([prog, *map(shlex.quote, argv if argv is not None else sys.argv[1:])])
    card = write_model_card(Path(args.export), _card(command, args.seed, args.epochs, seconds, accuracy))
    print(f"held-out accuracy {accuracy:.4f}; wrote {path} and {card} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
