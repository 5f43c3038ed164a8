"""``diffexit train uem``: train DeeDiff uncertainty heads on a class-conditional diffusers DiT.

The method and its outputs are :mod:`diffexit.uem.train`; this command picks the model (``--model``, default the
embedded digits DiT) and the images (``--data``: scikit-learn's digits, or an ImageFolder), then runs it. Seeded and
resumable (``--resume``); runs under ``accelerate launch``.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import torch

from ..common.cli_help import HelpFormatter
from ..uem.losses import TARGETS
from ..uem.train import DEFAULT_LR, MODES, UEMTraining, train_uem
from .models import load_dit_backbone

DEFAULTS = UEMTraining(out=Path("."))


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train DeeDiff uncertainty heads (UEMs) on a class-conditional diffusers DiT; seeded, resumable, "
                    "runs under `accelerate launch`.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", required=True, help="output directory (checkpoints, UEM weights, log)")
    p.add_argument("--model", default=None,
                   help="a diffusers DiTTransformer2DModel directory, or a pipeline directory with transformer/ "
                        "(and vae/, scheduler/ if it has them); default: the embedded digits DiT")
    p.add_argument("--data", default="digits",
                   help="'digits' (scikit-learn's bundled digits, train split) or an ImageFolder directory "
                        "(one sub-directory per class)")
    p.add_argument("--mode", choices=MODES, default=DEFAULTS.mode,
                   help="frozen: only the UEMs learn; full: fine-tune the backbone too (the paper's training)")
    # exit-cost is the default because it wins `diffexit bench images` at matched layer ratio (README).
    p.add_argument("--target", choices=sorted(TARGETS), default=DEFAULTS.target,
                   help="what the UEMs regress onto (recorded in the UEM config): 'paper', DeeDiff's "
                        "tanh|eps_k - eps|; 'exit-cost', tanh|eps_k - eps_K|, the distance from the full-depth "
                        "prediction; 'normalized', the paper's error relative to full depth's "
                        "(see diffexit.uem.losses)")
    p.add_argument("--steps", type=int, default=DEFAULTS.steps, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="images per step, over all processes")
    p.add_argument("--lr", type=float, default=None,
                   help=f"AdamW learning rate (default: {DEFAULT_LR['frozen']:g} frozen, {DEFAULT_LR['full']:g} full)")
    p.add_argument("--lam", type=float, default=DEFAULTS.lam, help="weight of L_u")
    p.add_argument("--beta", type=float, default=DEFAULTS.beta, help="weight of L_UAL")
    p.add_argument("--cfg-dropout", type=float, default=DEFAULTS.cfg_dropout,
                   help="probability of training a sample on the null class, as guided sampling uses it")
    p.add_argument("--ema-decay", type=float, default=DEFAULTS.ema_decay)
    p.add_argument("--checkpoint-every", type=int, default=DEFAULTS.checkpoint_every)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    return p


def load_images(data: str, pixel_size: int, channels: int):
    """A dataset of ``(image [channels, S, S] in [-1, 1], label)``, and its number of classes."""
    if data == "digits":
        from ..uem.digits.data import NUM_CLASSES, load_digits_dataset

        if channels not in (1, 3):
            raise ValueError(f"the digits are grey; a model with {channels} input channels cannot take them")
        images, labels = load_digits_dataset(image_size=pixel_size, split="train").tensors
        return torch.utils.data.TensorDataset(images.expand(-1, channels, -1, -1).contiguous(), labels), NUM_CLASSES
    if not Path(data).is_dir():
        raise ValueError(f"--data must be 'digits' or an ImageFolder directory; {data!r} is neither")
    from torchvision import datasets, transforms

    if channels not in (1, 3):
        raise ValueError(f"ImageFolder images are grey or RGB; the model wants {channels} channels")
    dataset = datasets.ImageFolder(
        data,
        transform=transforms.Compose([
            transforms.Grayscale(1) if channels == 1 else transforms.Lambda(lambda im: im.convert("RGB")),
            transforms.Resize(pixel_size),
            transforms.CenterCrop(pixel_size),
            transforms.ToTensor(),
            transforms.Normalize([0.5] * channels, [0.5] * channels),
        ]),
    )
    return dataset, len(dataset.classes)


def main(argv: list[str], prog: str = "diffexit train uem") -> int:
    parser = _parser(prog)
    args = parser.parse_args(argv)
    from accelerate import Accelerator

    run = UEMTraining(out=Path(args.out), mode=args.mode, target=args.target, steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, lam=args.lam, beta=args.beta,
                      cfg_dropout=args.cfg_dropout, ema_decay=args.ema_decay, checkpoint_every=args.checkpoint_every,
                      seed=args.seed)
    accelerator = Accelerator()
    try:
        run.check()
        transformer, vae, noise_scheduler = load_dit_backbone(Path(args.model) if args.model else None)
        vae_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        pixel_channels = vae.config.in_channels if vae is not None else transformer.config.in_channels
        dataset, num_classes = load_images(args.data, transformer.config.sample_size * vae_factor, pixel_channels)
        if num_classes > transformer.config.num_embeds_ada_norm:
            raise ValueError(f"the data has {num_classes} classes but the model embeds only "
                             f"{transformer.config.num_embeds_ada_norm}")
        record = {"command": f"{prog} {shlex.join(argv)}", "model": args.model or "embedded", "data": args.data}
        train_uem(run, transformer, vae, noise_scheduler, dataset, accelerator=accelerator, resume=args.resume,
                  record=record)
    except ValueError as err:
        parser.error(str(err))
    return 0
