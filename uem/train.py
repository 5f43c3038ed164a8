"""``diffexit train uem``: train DeeDiff uncertainty heads on a class-conditional diffusers DiT.

Every step draws a batch of images, noises them at uniform random timesteps of the model's training schedule, runs
every exit of the model once (:func:`diffexit.uem.early_exit.exit_predictions`) and minimises the DeeDiff loss
``L_simple + lambda * L_u + beta * L_UAL`` (:mod:`diffexit.uem.losses`). Two modes:

- ``frozen``: the backbone stays as it is and only the UEMs learn (the backbone runs without autograd);
- ``full``: backbone and UEMs learn together, so each exit's prediction improves too.

Reproducible and resumable: the batch order, noise, timesteps and guidance dropout of step ``s`` depend only on
``(seed, s)``, and checkpoints (accelerate ``save_state``: model, optimizer, EMA) are written to ``OUT/checkpoints``,
so ``--resume`` continues to the same weights an uninterrupted run reaches. Runs under ``accelerate launch``.

Outputs in ``OUT``: ``uem/`` (the EMA UEM weights, ``UEMStack.save_pretrained``, plus ``training.json`` with the
command, seed and data), ``transformer/`` in ``full`` mode (the EMA backbone), and ``log.jsonl`` (losses per step).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import nn

CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 2
DEFAULT_LR = {"frozen": 1e-3, "full": 1e-4}


def _parser(prog: str) -> argparse.ArgumentParser:
    from .losses import TARGETS

    p = argparse.ArgumentParser(
        prog=prog,
        description="Train DeeDiff uncertainty heads (UEMs) on a class-conditional diffusers DiT; seeded, resumable, "
                    "runs under `accelerate launch`.",
    )
    p.add_argument("--out", required=True, help="output directory (checkpoints, UEM weights, log)")
    p.add_argument("--model", default=None,
                   help="a diffusers DiTTransformer2DModel directory, or a pipeline directory with transformer/ "
                        "(and vae/, scheduler/ if it has them); default: the embedded digits DiT")
    p.add_argument("--data", default="digits",
                   help="'digits' (scikit-learn's bundled digits, train split) or an ImageFolder directory "
                        "(one sub-directory per class)")
    p.add_argument("--mode", choices=("frozen", "full"), default="frozen",
                   help="frozen: only the UEMs learn; full: fine-tune the backbone too")
    # exit-cost is the default because it wins `diffexit bench images` at matched layer ratio (README, "Results on
    # the embedded digits DiT"): calibrated at budget 0.02, 75% class agreement at 0.69 of the blocks, paper 55%.
    p.add_argument("--target", choices=sorted(TARGETS), default="exit-cost",
                   help="what the UEMs regress onto (recorded in the UEM config; default: %(default)s): 'paper', "
                        "DeeDiff's tanh|eps_k - eps|; "
                        "'exit-cost', tanh|eps_k - eps_K|, the distance from the full-depth prediction; "
                        "'normalized', the paper's error relative to full depth's (see diffexit.uem.losses)")
    p.add_argument("--steps", type=int, default=2000, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="images per step, over all processes")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-3 frozen, 1e-4 full)")
    p.add_argument("--lam", type=float, default=1.0, help="weight of L_u")
    p.add_argument("--beta", type=float, default=1.0, help="weight of L_UAL")
    p.add_argument("--cfg-dropout", type=float, default=0.1,
                   help="probability of training a sample on the null class, as guided sampling uses it")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    return p


def _check_args(args) -> None:
    for name in ("steps", "batch_size", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if not 0.0 <= args.cfg_dropout < 1.0:
        raise ValueError(f"--cfg-dropout must be in [0, 1), got {args.cfg_dropout}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.lam < 0 or args.beta < 0:
        raise ValueError(f"--lam and --beta must be >= 0, got {args.lam} and {args.beta}")


def _default_model_dir() -> Path:
    from .embedded import DIT_COMMAND, DIT_DIR

    if not (DIT_DIR / "model_index.json").is_file():
        raise ValueError(f"the embedded digits DiT is missing from {DIT_DIR}; make it with `{DIT_COMMAND}`, or "
                         f"pass --model")
    return DIT_DIR


def load_backbone(model_dir: Path):
    """``(transformer, vae or None, noise scheduler)`` from a transformer or pipeline directory."""
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

    model_dir = Path(model_dir)
    if (model_dir / "model_index.json").exists():
        transformer_dir = model_dir / "transformer"
        vae = None
        if (model_dir / "vae").is_dir():
            vae = AutoencoderKL.from_pretrained(model_dir / "vae", dtype=torch.float32)
        sched_dir = model_dir / "scheduler"
        scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(sched_dir)) if sched_dir.is_dir() else None
    elif (model_dir / "config.json").exists():
        transformer_dir, vae, scheduler = model_dir, None, None
    else:
        raise ValueError(f"{model_dir} is neither a diffusers model directory (config.json) nor a pipeline "
                         f"directory (model_index.json)")
    class_name = json.loads((transformer_dir / "config.json").read_text()).get("_class_name")
    if class_name != "DiTTransformer2DModel":
        raise ValueError(
            f"`diffexit train uem` trains UEMs on a class-conditional DiTTransformer2DModel; {transformer_dir} holds "
            f"a {class_name} (PixArt and SD3 need captions, which this trainer does not read)"
        )
    # Trained in fp32 whatever the stored dtype (the embedded model ships fp16).
    transformer = DiTTransformer2DModel.from_pretrained(transformer_dir, dtype=torch.float32)
    if scheduler is None:
        # A bare transformer directory carries no schedule; diffusers' DDPM default is the one DiT trains with.
        scheduler = DDPMScheduler()
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"the DeeDiff loss is on predicted noise, but the model predicts "
                         f"{scheduler.config.prediction_type!r}")
    return transformer, vae, scheduler


def load_images(data: str, pixel_size: int, channels: int):
    """A dataset of ``(image [channels, S, S] in [-1, 1], label)``, and its number of classes."""
    if data == "digits":
        from .digits import NUM_CLASSES, load_digits_dataset

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


def batch_indices(step: int, batch_size: int, size: int, seed: int) -> torch.Tensor:
    """Dataset indices of ``step``'s batch: consecutive slices of one seeded permutation per epoch."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), size)
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.extend(order[offset : offset + batch_size - len(out)].tolist())
    return torch.tensor(out)


class DeeDiffTrainee(nn.Module):
    """Backbone plus UEMs as one module, so accelerate wraps (and synchronises) one forward.

    A frozen backbone is held outside the module's parameters: it is neither trained nor checkpointed.
    """

    def __init__(self, transformer: nn.Module, uem: nn.Module, full: bool):
        super().__init__()
        self.uem = uem
        self.full = full
        if full:
            self.transformer = transformer
        else:
            transformer.requires_grad_(False)
            object.__setattr__(self, "transformer", transformer)

    def forward(self, noisy, timesteps, labels, noise, *, lam, beta, target):
        from .early_exit import exit_predictions
        from .losses import deediff_loss

        pred = exit_predictions(self.transformer, self.uem, noisy, timestep=timesteps, class_labels=labels,
                                backbone_grad=self.full)
        eps_layers = pred.sample[:, :, : noise.shape[1]]  # learned-sigma models append a variance half
        return deediff_loss(eps_layers, pred.uncertainty, noise, patch_size=self.transformer.config.patch_size,
                            lam=lam, beta=beta, target=target)


def _latest_checkpoint(out: Path) -> Optional[Path]:
    found = sorted((out / CHECKPOINTS).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def _setup(args):
    """Check the run against its inputs: ``(latest checkpoint, model dir, transformer, vae, schedule, data)``."""
    latest = _latest_checkpoint(Path(args.out))
    if latest is not None and not args.resume:
        raise ValueError(f"{args.out} already holds checkpoints; pass --resume to continue, or choose another --out")
    model_dir = Path(args.model) if args.model else _default_model_dir()
    transformer, vae, noise_scheduler = load_backbone(model_dir)
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    pixel_channels = vae.config.in_channels if vae is not None else transformer.config.in_channels
    dataset, num_classes = load_images(args.data, transformer.config.sample_size * vae_factor, pixel_channels)
    null_class = transformer.config.num_embeds_ada_norm
    if num_classes > null_class:
        raise ValueError(f"the data has {num_classes} classes but the model embeds only {null_class}")
    return latest, model_dir, transformer, vae, noise_scheduler, dataset


def main(argv: list[str], prog: str = "diffexit train uem") -> int:
    parser = _parser(prog)
    args = parser.parse_args(argv)
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from .heads import UEMStack

    accelerator = Accelerator()
    world, rank = accelerator.num_processes, accelerator.process_index
    try:
        _check_args(args)
        if args.batch_size % world:
            raise ValueError(f"--batch-size {args.batch_size} does not split over {world} processes")
        latest, model_dir, transformer, vae, noise_scheduler, dataset = _setup(args)
    except ValueError as err:
        parser.error(str(err))
    out = Path(args.out)
    null_class = transformer.config.num_embeds_ada_norm
    torch.manual_seed(args.seed)
    uem = UEMStack.for_model(transformer, target=args.target)
    # Eval mode throughout: diffusers' DiT redraws a random label dropout in every block's embedder in train mode;
    # the loop below drops labels once per sample instead. The UEMs have no train-mode behaviour.
    trainee = DeeDiffTrainee(transformer.eval(), uem, full=args.mode == "full")
    if vae is not None:
        vae.requires_grad_(False).eval().to(accelerator.device)
    trainable = [p for p in trainee.parameters() if p.requires_grad]
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.mode]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    ema = EMAModel(trainable, decay=args.ema_decay)
    trainee, optimizer = accelerator.prepare(trainee, optimizer)
    core = accelerator.unwrap_model(trainee)
    core.transformer.to(accelerator.device)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)

    start = 0
    log_path = out / "log.jsonl"
    if latest is not None:
        accelerator.load_state(str(latest))
        start = int(latest.name.split("-")[1])
        if start > args.steps:
            raise ValueError(f"the latest checkpoint is at step {start}, past --steps {args.steps}")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        kept = [line for line in (log_path.read_text().splitlines() if log_path.exists() else [])
                if json.loads(line)["step"] <= start]
        log_path.write_text("".join(line + "\n" for line in kept))

    alphas = noise_scheduler.config.num_train_timesteps
    per_process = args.batch_size // world
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train uem",
               disable=not accelerator.is_main_process)
    for step in bar:
        idx = batch_indices(step, args.batch_size, len(dataset), args.seed)[rank::world]
        images, labels = torch.utils.data.default_collate([dataset[i] for i in idx.tolist()])
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1_009 + rank)
        images, labels = images.to(accelerator.device), labels.to(accelerator.device)
        with torch.no_grad():
            latents = images if vae is None else _encode(vae, images, g)
        noise = torch.randn(latents.shape, generator=g).to(accelerator.device)
        timesteps = torch.randint(0, alphas, (per_process,), generator=g).to(accelerator.device)
        drop = (torch.rand(per_process, generator=g) < args.cfg_dropout).to(accelerator.device)
        labels = torch.where(drop, torch.full_like(labels, null_class), labels)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        loss = trainee(noisy, timesteps, labels, noise, lam=args.lam, beta=args.beta, target=args.target)
        accelerator.backward(loss.total)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(trainable)
        terms = {k: float(accelerator.reduce(v.detach(), "mean")) for k, v in loss._asdict().items()}
        bar.set_postfix(loss=f"{terms['total']:.4f}", l_u=f"{terms['uncertainty']:.4f}")
        done = step + 1
        if accelerator.is_main_process:
            with log_path.open("a") as f:
                f.write(json.dumps({"step": done, **terms}) + "\n")
        if done % args.checkpoint_every == 0 or done == args.steps:
            _save_checkpoint(accelerator, out, done)

    if accelerator.is_main_process:
        _export(core, ema, trainable, out, f"{prog} {shlex.join(argv)}", args, model_dir, lr)
    accelerator.wait_for_everyone()
    return 0


def _encode(vae, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    latents = vae.encode(images).latent_dist.sample(generator=generator)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def _save_checkpoint(accelerator, out: Path, step: int) -> None:
    accelerator.save_state(str(out / CHECKPOINTS / f"step-{step}"))
    if accelerator.is_main_process:
        found = sorted((out / CHECKPOINTS).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        for old in found[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old)


def _export(core: DeeDiffTrainee, ema, trainable, out: Path, command: str, args, model_dir: Path, lr: float) -> None:
    """Save the EMA weights: the UEMs always, the backbone too after a full fine-tune."""
    ema.store(trainable)
    ema.copy_to(trainable)
    core.uem.save_pretrained(out / "uem")
    if core.full:
        core.transformer.save_pretrained(out / "transformer")
    ema.restore(trainable)
    record = {
        "command": command,
        "args": vars(args),
        "model": str(model_dir),
        "data": args.data,
        "lr": lr,
        "seed": args.seed,
        "steps": args.steps,
    }
    (out / "uem" / "training.json").write_text(json.dumps(record, indent=2) + "\n")
