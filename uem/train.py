"""Training DeeDiff uncertainty heads (and, in ``full`` mode, the backbone) on a class-conditional diffusers DiT.

Every step draws a batch of images, noises them at uniform random timesteps of the model's training schedule, runs
every exit of the model once (:func:`diffexit.uem.early_exit.exit_predictions`) and minimises the DeeDiff loss
``L_simple + lambda * L_u + beta * L_UAL`` (:mod:`diffexit.uem.losses`). Two modes:

- ``frozen``: the backbone stays as it is and only the UEMs learn (the backbone runs without autograd);
- ``full``: backbone and UEMs learn together, so each exit's prediction improves too (the paper's training).

Reproducible and resumable: the batch order, noise, timesteps and guidance dropout of step ``s`` depend only on
``(seed, s)``, and checkpoints (accelerate ``save_state``: model, optimizer, EMA) are written atomically to
``OUT/checkpoints/step-NNNNNN``, so a resumed run reaches the same weights an uninterrupted one does. Runs under
``accelerate launch``. The command line (``diffexit train uem``) is :mod:`diffexit.app.train_uem`.

Outputs in ``OUT``: ``uem/`` (the EMA UEM weights, ``UEMStack.save_pretrained``, plus ``training.json`` with the
command, seed and data), ``transformer/`` in ``full`` mode (the EMA backbone), and ``log.jsonl`` (losses per step).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..common.training import EMA, checkpoint_step, numbered_checkpoints, save_numbered_checkpoint
from .early_exit import exit_predictions
from .heads import UEMStack
from .losses import deediff_loss

CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 2
DEFAULT_LR = {"frozen": 1e-3, "full": 1e-4}
MODES = ("frozen", "full")


@dataclass(frozen=True)
class UEMTraining:
    """One run's settings (the command line's flags; ``training.json`` records them).

    ``lr`` None means :data:`DEFAULT_LR` of the mode.
    """

    out: Path
    mode: str = "frozen"
    target: str = "exit-cost"
    steps: int = 2000
    batch_size: int = 64
    lr: Optional[float] = None
    lam: float = 1.0
    beta: float = 1.0
    cfg_dropout: float = 0.1
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    seed: int = 0

    def check(self) -> None:
        """Raise ``ValueError`` naming the flag that is out of range."""
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}, got {self.mode!r}")
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"--cfg-dropout must be in [0, 1), got {self.cfg_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.lam < 0 or self.beta < 0:
            raise ValueError(f"--lam and --beta must be >= 0, got {self.lam} and {self.beta}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]


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
        pred = exit_predictions(self.transformer, self.uem, noisy, timestep=timesteps, class_labels=labels,
                                backbone_grad=self.full)
        eps_layers = pred.sample[:, :, : noise.shape[1]]  # learned-sigma models append a variance half
        return deediff_loss(eps_layers, pred.uncertainty, noise, patch_size=self.transformer.config.patch_size,
                            lam=lam, beta=beta, target=target)


def latest_checkpoint(out: Path) -> Optional[Path]:
    """The newest complete checkpoint of the run in ``out``, or None."""
    found = numbered_checkpoints(Path(out) / CHECKPOINTS)
    return found[-1] if found else None


def _encode(vae, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    latents = vae.encode(images).latent_dist.sample(generator=generator)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def train_uem(run: UEMTraining, transformer: nn.Module, vae, noise_scheduler, dataset, *, accelerator,
              resume: bool, record: dict) -> Path:
    """Train (or resume) the run in ``run.out`` up to ``run.steps``; returns the exported ``OUT/uem`` folder.

    ``dataset`` yields ``(image [C, H, W] in [-1, 1], label)`` at the model's pixel size (the VAE's input size when
    there is one); ``record`` (the command, the model, the data) goes into ``training.json`` with the settings.
    """
    from tqdm.auto import tqdm

    out = Path(run.out)
    world, rank = accelerator.num_processes, accelerator.process_index
    latest = latest_checkpoint(out)
    if latest is not None and not resume:
        raise ValueError(f"{out} already holds checkpoints; pass --resume to continue, or choose another --out")
    if run.batch_size % world:
        raise ValueError(f"--batch-size {run.batch_size} does not split over {world} processes")
    null_class = transformer.config.num_embeds_ada_norm
    torch.manual_seed(run.seed)
    uem = UEMStack.for_model(transformer, target=run.target)
    # Eval mode throughout: diffusers' DiT redraws a random label dropout in every block's embedder in train mode;
    # the loop below drops labels once per sample instead. The UEMs have no train-mode behaviour.
    trainee = DeeDiffTrainee(transformer.eval(), uem, full=run.mode == "full")
    if vae is not None:
        vae.requires_grad_(False).eval().to(accelerator.device)
    optimizer = torch.optim.AdamW([p for p in trainee.parameters() if p.requires_grad], lr=run.learning_rate)
    ema = EMA(trainee, run.ema_decay)
    trainee, optimizer = accelerator.prepare(trainee, optimizer)
    core = accelerator.unwrap_model(trainee)
    core.transformer.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)

    start = 0
    log_path = out / "log.jsonl"
    if latest is not None:
        accelerator.load_state(str(latest))
        start = checkpoint_step(latest)
        if start > run.steps:
            raise ValueError(f"the latest checkpoint is at step {start}, past --steps {run.steps}")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        # Drop the records written after that checkpoint: the resumed run writes them again.
        kept = [line for line in (log_path.read_text().splitlines() if log_path.exists() else [])
                if json.loads(line)["step"] <= start]
        log_path.write_text("".join(line + "\n" for line in kept))

    alphas = noise_scheduler.config.num_train_timesteps
    per_process = run.batch_size // world
    bar = tqdm(range(start, run.steps), initial=start, total=run.steps, desc="train uem",
               disable=not accelerator.is_main_process)
    for step in bar:
        idx = batch_indices(step, run.batch_size, len(dataset), run.seed)[rank::world]
        images, labels = torch.utils.data.default_collate([dataset[i] for i in idx.tolist()])
        g = torch.Generator().manual_seed(run.seed * 1_000_003 + step * 1_009 + rank)
        images, labels = images.to(accelerator.device), labels.to(accelerator.device)
        with torch.no_grad():
            latents = images if vae is None else _encode(vae, images, g)
        noise = torch.randn(latents.shape, generator=g).to(accelerator.device)
        timesteps = torch.randint(0, alphas, (per_process,), generator=g).to(accelerator.device)
        drop = (torch.rand(per_process, generator=g) < run.cfg_dropout).to(accelerator.device)
        labels = torch.where(drop, torch.full_like(labels, null_class), labels)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        loss = trainee(noisy, timesteps, labels, noise, lam=run.lam, beta=run.beta, target=run.target)
        accelerator.backward(loss.total)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(core)
        terms = {k: float(accelerator.reduce(v.detach(), "mean")) for k, v in loss._asdict().items()}
        bar.set_postfix(loss=f"{terms['total']:.4f}", l_u=f"{terms['uncertainty']:.4f}")
        done = step + 1
        if accelerator.is_main_process:
            with log_path.open("a") as f:
                f.write(json.dumps({"step": done, **terms}) + "\n")
        if done % run.checkpoint_every == 0 or done == run.steps:
            save_numbered_checkpoint(accelerator, out / CHECKPOINTS, done, KEEP_CHECKPOINTS)

    if accelerator.is_main_process:
        _export(core, ema, run, record)
    accelerator.wait_for_everyone()
    return out / "uem"


def _export(core: DeeDiffTrainee, ema: EMA, run: UEMTraining, record: dict) -> None:
    """Save the EMA weights: the UEMs always, the backbone too after a full fine-tune."""
    out = Path(run.out)
    with ema.applied(core):
        core.uem.save_pretrained(out / "uem")
        if core.full:
            core.transformer.save_pretrained(out / "transformer")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(run).items()}
    training = {**record, "args": settings, "lr": run.learning_rate, "seed": run.seed, "steps": run.steps}
    (out / "uem" / "training.json").write_text(json.dumps(training, indent=2) + "\n")
