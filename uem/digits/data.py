"""scikit-learn's bundled handwritten digits as a diffusion training set.

``sklearn.datasets.load_digits`` holds 1797 grey 8x8 images with integer intensities 0..16, read from a
file inside scikit-learn, so this works offline. They are scaled to [-1, 1] (the range a DDPM denoises)
and upsampled bilinearly to ``image_size`` so a patch-2 transformer sees enough tokens.

The train/test split is a fixed permutation (seed 0): the last 300 images of it are the test split, the
first 1497 the train split. Every model in this package (backbone, UEMs, classifier) uses the same
split, so "held out" means the same 300 images everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

SPLITS = ("train", "test", "all")
NUM_CLASSES = 10
NUM_TEST = 300
SPLIT_SEED = 0
SOURCE_SIZE = 8


def split_indices(split: str, total: int) -> torch.Tensor:
    """Indices (int64, sorted) of ``split`` among ``total`` images, from the fixed seeded permutation."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "all":
        return torch.arange(total)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(SPLIT_SEED))
    chosen = order[:-NUM_TEST] if split == "train" else order[-NUM_TEST:]
    return chosen.sort().values


def load_digits_dataset(image_size: int = 16, split: str = "train") -> TensorDataset:
    """The digits as ``TensorDataset(images, labels)``.

    Returns:
        images: float32 ``[N, 1, image_size, image_size]`` in [-1, 1] (0 intensity -> -1, 16 -> 1).
        labels: int64 ``[N]`` in 0..9.
        N is 1497 for "train", 300 for "test", 1797 for "all".
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < SOURCE_SIZE:
        raise ValueError(
            f"image_size must be an int >= {SOURCE_SIZE} (the digits are {SOURCE_SIZE}x{SOURCE_SIZE}; "
            f"they are only upsampled), got {image_size!r}"
        )
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().unsqueeze(1) / 16.0
    labels = torch.from_numpy(bunch.target).long()
    if image_size != SOURCE_SIZE:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.clamp(0.0, 1.0) * 2.0 - 1.0
    keep = split_indices(split, len(labels))
    return TensorDataset(images[keep].contiguous(), labels[keep].contiguous())
