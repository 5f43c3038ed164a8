"""How close an image is to a reference: PSNR, the figure the benchmark and the demo report against full depth."""

from __future__ import annotations

import math
from typing import Optional

import torch


def psnr(images: torch.Tensor, reference: torch.Tensor) -> Optional[float]:
    """PSNR in dB of the mean squared error over all pixels of all ``images`` against ``reference`` (same shape,
    values in [0, 1]), computed in float64; None where they are identical (the PSNR would be infinite)."""
    if images.shape != reference.shape:
        raise ValueError(f"PSNR compares images of one shape, got {tuple(images.shape)} and {tuple(reference.shape)}")
    mse = float(((images.double() - reference.double()) ** 2).mean())
    return None if mse == 0 else 10.0 * math.log10(1.0 / mse)
