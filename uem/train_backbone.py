"""``diffexit train image``: train the embedded digits DiT backbone, and export what ships.

The model is a diffusers ``DiTTransformer2DModel`` in pixel space: 16x16x1 digits, patch 2 (64 tokens),
12 blocks of 4 heads x 32, class-conditional over the 10 digits with label 1000 (``num_embeds_ada_norm``)
as the null class for classifier-free guidance, as ``DiTPipeline`` expects. The objective is DDPM's
epsilon MSE under a cosine (``squaredcos_cap_v2``) noise schedule of 1000 steps; the linear schedule
leaves 16x16 images almost pure noise (SNR below 0.03) for the last 40% of its steps.

Two departures from a stock ``DiTTransformer2DModel``, both fixed at construction (:func:`build_transformer`):

- **adaLN-Zero initialisation**, as in the DiT paper: every block's modulation and the output layers start
  at zero, so each block starts as the identity. diffusers leaves PyTorch's default init.
- **One label dropout per sample.** diffusers gives every block (and the output layer) its own
  ``LabelEmbedding`` that drops labels independently in train mode, so a sample is almost never
  unconditional in all 13 places at once, and the null class that guidance relies on is barely trained.
  The per-module dropout is switched off and the trainer replaces 10% of the labels by 1000 itself.

A run lives in a directory (default ``runs/dit-digits``): ``run.json`` (hyperparameters and the command),
``log.jsonl`` and ``checkpoints/step-NNNNNN`` (accelerate state: model, optimizer, RNG states, the EMA and
the step). ``--resume`` continues from the newest checkpoint and gives the same weights as a run that was
never stopped: every random draw of a step comes from a generator seeded by (seed, process, step).
``--resume --steps N`` with a larger N extends a finished run: the cosine learning rate restarts, stretched
to N, from the newest checkpoint, and ``run.json`` records the extension and its command.
``--export DIR`` writes the EMA weights as a ``DigitsDiTPipeline`` (fp16 safetensors + DDIM config),
measures them with the digits classifier and writes ``DIR/MODEL_CARD.md``.

Runs unchanged under ``accelerate launch``; ``--batch-size`` is per process.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .digits import NUM_CLASSES, load_digits_dataset

DEFAULT_OUT = "runs/dit-digits"
NULL_CLASS = 1000
PATCH_SIZE = 2
LABEL_DROPOUT = 0.1
WARMUP_STEPS = 100
FINAL_LR_FRACTION = 0.1
EMA_MAX_DECAY = 0.9995
GRAD_CLIP = 1.0
KEEP_CHECKPOINTS = 2
# The budget for the shipped run on 2 CPU cores; the trainer prints its own estimate against it.
TIME_BUDGET_MIN = 30
# Noise schedule shared by training (DDPM) and the shipped sampler (DDIM).
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=True)
# The hyperparameters that define a run: a resumed run must use the same ones, or it would not be the same run.
RUN_KEYS = ("steps", "batch_size", "lr", "seed", "image_size", "num_layers", "num_heads", "head_dim", "threads")
CARD_NAME = "MODEL_CARD.md"


def build_transformer(image_size: int = 16, num_layers: int = 12, num_heads: int = 4, head_dim: int = 32):
    """A fresh class-conditional pixel-space ``DiTTransformer2DModel`` (1 channel in and out, patch 2),
    adaLN-Zero initialised, with the per-block label dropout off (see the module docstring).

    Rows 10..999 of each label table are never used (digits are 0..9, the null class is 1000); they start
    at zero and stay there, which costs nothing and keeps the shipped file compressible.
    """
    from diffusers import DiTTransformer2DModel
    from diffusers.models.embeddings import LabelEmbedding

    if image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a multiple of the patch size {PATCH_SIZE}, got {image_size}")
    model = DiTTransformer2DModel(
        num_attention_heads=num_heads,
        attention_head_dim=head_dim,
        in_channels=1,
        out_channels=1,
        num_layers=num_layers,
        sample_size=image_size,
        patch_size=PATCH_SIZE,
        num_embeds_ada_norm=NULL_CLASS,
        norm_type="ada_norm_zero",
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, LabelEmbedding):
                table = module.embedding_table.weight
                nn.init.normal_(table, std=0.02)
                table[NUM_CLASSES:NULL_CLASS].zero_()
        patch = model.pos_embed.proj.weight
        nn.init.xavier_uniform_(patch.view(patch.shape[0], -1))
        nn.init.zeros_(model.pos_embed.proj.bias)
        for block in model.transformer_blocks:
            embed = block.norm1.emb.timestep_embedder
            nn.init.normal_(embed.linear_1.weight, std=0.02)
            nn.init.normal_(embed.linear_2.weight, std=0.02)
            nn.init.zeros_(block.norm1.linear.weight)
            nn.init.zeros_(block.norm1.linear.bias)
        for layer in (model.proj_out_1, model.proj_out_2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
    return disable_label_dropout(model)


def disable_label_dropout(model):
    """Switch off the label dropout inside every ``LabelEmbedding`` of a DiT (returns the model).

    ``from_pretrained`` builds them with dropout 0.1 again (it is not part of the config), and in train mode
    each block would then drop labels on its own; anything that trains this backbone further should call
    this first and drop labels itself, as :func:`epsilon_loss` does.
    """
    from diffusers.models.embeddings import LabelEmbedding

    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return model


def build_noise_scheduler():
    """The training noise schedule: diffusers ``DDPMScheduler`` with :data:`SCHEDULE`."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE)


def build_sampling_scheduler():
    """The shipped sampler: DDIM on the training schedule, with "trailing" spacing so that the first step
    starts at t = 999, where the noise the pipeline draws actually belongs."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULE, timestep_spacing="trailing")


def epsilon_loss(model, noise_scheduler, images, labels, generator: torch.Generator, label_dropout: float = LABEL_DROPOUT):
    """DDPM epsilon MSE on one batch, with labels replaced by the null class at rate ``label_dropout``.

    Args:
        images: float ``[B, 1, S, S]`` in [-1, 1], on the model's device.
        labels: int64 ``[B]`` digits 0..9, on the model's device.
        generator: a CPU generator; it draws the timesteps, the noise and the dropped labels, in that order.
    Returns:
        the scalar float32 loss.
    """
    n, device = len(images), images.device
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=generator).to(device)
    noise = torch.randn(images.shape, generator=generator).to(device, images.dtype)
    dropped = (torch.rand(n, generator=generator) < label_dropout).to(device)
    labels = torch.where(dropped, torch.full_like(labels, NULL_CLASS), labels)
    noisy = noise_scheduler.add_noise(images, noise, timesteps)
    prediction = model(noisy, timestep=timesteps, class_labels=labels).sample
    return F.mse_loss(prediction.float(), noise.float())


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warmup over ``min(100, steps // 10)`` steps, then a cosine from ``peak`` to a tenth of it."""
    warmup = max(1, min(WARMUP_STEPS, steps // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_generator(seed: int, process: int, step: int) -> torch.Generator:
    """The generator for all random draws of one training step; a function of (seed, process, step) alone,
    so a resumed run draws exactly what an uninterrupted one would."""
    state = np.random.SeedSequence([seed, process, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class EMA:
    """Exponential moving average of a model's parameters, kept in float32.

    Update ``n`` (0-based) uses decay ``min(max_decay, (1 + n) / (10 + n))``: the average follows the model
    closely early in training and settles to a window of about ``1 / (1 - max_decay)`` steps.
    """

    def __init__(self, model: nn.Module, max_decay: float = EMA_MAX_DECAY):
        self.max_decay = max_decay
        self.updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.max_decay, (1 + self.updates) / (10 + self.updates))
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - decay)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            p.copy_(self.shadow[name].to(p.device, p.dtype))

    def state_dict(self) -> dict:
        return {"max_decay": self.max_decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.max_decay, self.updates = state["max_decay"], state["updates"]
        self.shadow = {name: tensor.float().clone() for name, tensor in state["shadow"].items()}


class Progress:
    """The step reached and the training seconds spent so far (checkpointed with the model)."""

    def __init__(self):
        self.step = 0
        self.seconds = 0.0

    def state_dict(self) -> dict:
        return {"step": self.step, "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.seconds = int(state["step"]), float(state["seconds"])


def checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def _schedule_totals(run: dict):
    """Step -> the run length its learning rate is scheduled over.

    A run extended on resume (``--resume --steps`` larger than before) stretches its cosine to the new
    length from the step it was extended at (a warm restart); earlier steps keep the length they were
    trained under, so a resume from any checkpoint retraces the same history.
    """
    extensions = run.get("extensions", [])
    first = extensions[0]["previous_steps"] if extensions else run["config"]["steps"]
    segments = [(0, first)] + [(e["from_step"], e["steps"]) for e in extensions]
    return lambda step: [total for begin, total in segments if begin <= step][-1]


def _run_config(args) -> dict:
    return {key: getattr(args, key) for key in RUN_KEYS}


def _check_args(args) -> None:
    for key in ("steps", "batch_size", "num_layers", "num_heads", "head_dim", "threads", "checkpoint_every",
                "log_every", "eval_per_class", "eval_steps"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")


def train(args, command: str):
    """Train (or resume) the run in ``args.out`` up to ``args.steps``.

    Returns ``(accelerator, model, ema, progress, run)``: the unwrapped model, its EMA, where training stopped,
    and the run's ``run.json`` contents.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    run_dir = Path(args.out)
    found = checkpoints(run_dir)
    config = _run_config(args)
    if args.resume:
        if not (run_dir / "run.json").is_file() or not found:
            raise ValueError(f"--resume: no checkpoint under {run_dir}/checkpoints; start the run without --resume")
        run = json.loads((run_dir / "run.json").read_text())
        changed = {k: (run["config"][k], v) for k, v in config.items() if run["config"][k] != v and k != "steps"}
        if changed:
            raise ValueError(
                "--resume continues the same run, but these arguments differ from the checkpointed run "
                f"(saved, given): {changed}; pass the saved values or start a new run with another --out"
            )
        reached = int(found[-1].name[5:])
        if args.steps < run["config"]["steps"]:
            raise ValueError(f"--steps {args.steps} is below the run's {run['config']['steps']}; "
                             "a resumed run can only be extended")
        if args.steps > run["config"]["steps"]:
            run.setdefault("extensions", []).append(
                {"from_step": reached, "previous_steps": run["config"]["steps"], "steps": args.steps, "command": command}
            )
            run["config"]["steps"] = args.steps
    elif found:
        raise ValueError(f"{run_dir} already holds checkpoints; pass --resume to continue it, or choose another --out")
    else:
        run = {"config": config, "command": command}
    schedule_totals = _schedule_totals(run)

    torch.set_num_threads(args.threads)
    accelerator = Accelerator()
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run.json").write_text(json.dumps(run, indent=2) + "\n")

    set_seed(args.seed)
    model = build_transformer(args.image_size, args.num_layers, args.num_heads, args.head_dim)
    noise_scheduler = build_noise_scheduler()
    ema = EMA(model)
    progress = Progress()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(ema, progress)
    if args.resume:
        accelerator.load_state(str(found[-1]))
        accelerator.print(f"resumed from {found[-1]} (step {progress.step}, {progress.seconds / 60:.1f} min trained)")
        log_path = run_dir / "log.jsonl"
        if accelerator.is_main_process and log_path.is_file():
            # Drop the records written after that checkpoint: the resumed run writes them again.
            kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= progress.step]
            log_path.write_text("".join(line + "\n" for line in kept))

    images, labels = load_digits_dataset(args.image_size, "train").tensors
    unwrapped = accelerator.unwrap_model(model)
    params = sum(p.numel() for p in unwrapped.parameters())
    accelerator.print(
        f"DiT {args.num_layers} blocks x {args.num_heads} heads x {args.head_dim}, {params / 1e6:.2f}M parameters; "
        f"{len(images)} training digits at {args.image_size}x{args.image_size}; "
        f"{args.steps} steps of batch {args.batch_size} x {accelerator.num_processes} process(es), lr {args.lr}"
    )

    bar = tqdm(total=args.steps, initial=progress.step, desc="train image", disable=not accelerator.is_local_main_process)
    window: list[float] = []
    session_start_step, session_start = progress.step, time.perf_counter()
    model.train()
    tick = time.perf_counter()
    while progress.step < args.steps:
        generator = step_generator(args.seed, accelerator.process_index, progress.step)
        batch = torch.randint(len(images), (args.batch_size,), generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(progress.step, schedule_totals(progress.step), args.lr)
        loss = epsilon_loss(model, noise_scheduler, images[batch].to(accelerator.device),
                            labels[batch].to(accelerator.device), generator)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        ema.update(unwrapped)
        progress.step += 1
        now = time.perf_counter()
        progress.seconds += now - tick
        tick = now
        window.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")

        done_here = progress.step - session_start_step
        if done_here == min(10, args.steps - session_start_step):
            per_step = (now - session_start) / done_here
            total_min = per_step * args.steps / 60
            bar.write(
                f"time budget: {per_step:.2f} s/step -> about {total_min:.0f} min for {args.steps} steps here "
                f"({(args.steps - progress.step) * per_step / 60:.0f} min left); the shipped run's budget is "
                f"about {TIME_BUDGET_MIN} min on 2 CPU cores"
            )
        if progress.step % args.log_every == 0 or progress.step == args.steps:
            if accelerator.is_main_process:
                record = {"step": progress.step, "loss": float(np.mean(window)),
                          "lr": optimizer.param_groups[0]["lr"], "seconds": round(progress.seconds, 1)}
                with open(run_dir / "log.jsonl", "a") as log:
                    log.write(json.dumps(record) + "\n")
            window = []
        if progress.step % args.checkpoint_every == 0 or progress.step == args.steps:
            _save_checkpoint(accelerator, run_dir, progress.step)
    bar.close()
    return accelerator, unwrapped, ema, progress, run


def _save_checkpoint(accelerator, run_dir: Path, step: int) -> None:
    """Save into a temporary directory and rename it, so an interruption never leaves a partial ``step-N``."""
    final = run_dir / "checkpoints" / f"step-{step:06d}"
    if final.exists():
        return
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        partial.rename(final)
        for old in checkpoints(run_dir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old)


def export_pipeline(model: nn.Module, ema: EMA, directory: str | Path) -> Path:
    """Write the EMA weights (fp16 safetensors) and the DDIM sampler as a ``DigitsDiTPipeline`` to ``directory``."""
    from .pipeline import DigitsDiTPipeline

    transformer = copy.deepcopy(model).cpu()
    ema.copy_to(transformer)
    pipe = DigitsDiTPipeline(transformer=transformer.half(), scheduler=build_sampling_scheduler())
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return Path(directory)


@torch.no_grad()
def sample_digits(pipe, per_class: int, guidance_scale: float, steps: int, seed: int, batch_size: int = 100):
    """``per_class`` samples of each digit, in batches seeded ``seed, seed + 1, ...``.

    Returns ``(images [10 * per_class, 1, S, S] in [0, 1], labels [10 * per_class])``.
    """
    labels = torch.arange(NUM_CLASSES).repeat(per_class)
    chunks = []
    for i, chunk in enumerate(labels.split(batch_size)):
        generator = torch.Generator(pipe.device).manual_seed(seed + i)
        chunks.append(pipe(chunk.tolist(), guidance_scale=guidance_scale, generator=generator,
                           num_inference_steps=steps, output_type="pt").images.cpu())
    return torch.cat(chunks), labels


def _measure(directory: Path, args) -> dict:
    """Class agreement and Frechet distance of the exported pipeline, without guidance and at the default.

    The Frechet distance is biased upwards at small N, so the reference (real train digits against the
    real test digits) uses as many real digits as there are samples.
    """
    from .classifier import class_agreement, extract_features, frechet_distance, load_classifier, test_accuracy
    from .embedded import CLASSIFIER_DIR
    from .pipeline import DigitsDiTPipeline

    classifier = load_classifier(CLASSIFIER_DIR)
    pipe = DigitsDiTPipeline.from_pretrained(str(directory), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    count = NUM_CLASSES * args.eval_per_class
    test_images, _ = load_digits_dataset(args.image_size, "test").tensors
    test_features = extract_features(classifier, (test_images + 1) / 2)
    train_images, _ = load_digits_dataset(args.image_size, "train").tensors
    reference = frechet_distance(extract_features(classifier, (train_images[:count] + 1) / 2), test_features)
    figures = {"reference_frechet": reference, "reference_count": min(count, len(train_images)),
               "classifier_accuracy": test_accuracy(classifier), "rows": []}
    for scale in sorted({1.0, inspect_default_guidance()}):
        images, labels = sample_digits(pipe, args.eval_per_class, scale, args.eval_steps, args.seed)
        row = {"guidance_scale": scale, "class_agreement": class_agreement(images, labels, classifier),
               "frechet": frechet_distance(extract_features(classifier, images), test_features)}
        figures["rows"].append(row)
        print(f"guidance {scale:g}: class agreement {row['class_agreement']:.4f}, Frechet {row['frechet']:.2f} "
              f"(real train digits: {reference:.2f})")
    return figures


def inspect_default_guidance() -> float:
    """The ``guidance_scale`` that ``DigitsDiTPipeline.__call__`` uses by default."""
    import inspect

    from .pipeline import DigitsDiTPipeline

    return float(inspect.signature(DigitsDiTPipeline.__call__).parameters["guidance_scale"].default)


def _seconds_per_step(log_path: Path) -> np.ndarray:
    """Seconds per step between consecutive ``log.jsonl`` records (each spans ``--log-every`` steps)."""
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    return np.array([(b["seconds"] - a["seconds"]) / (b["step"] - a["step"]) for a, b in zip(records, records[1:])])


def _card(directory: Path, run: dict, progress: Progress, figures: dict, export_command: str, args) -> str:
    weights = directory / "transformer" / "diffusion_pytorch_model.safetensors"
    cfg = run["config"]
    params = sum(p.numel() for p in build_transformer(cfg["image_size"], cfg["num_layers"], cfg["num_heads"],
                                                      cfg["head_dim"]).parameters())
    commands = f"`{run['command']}`" + "".join(
        f", then `{e['command']}` (from step {e['from_step']}: the cosine stretched to {e['steps']} steps, "
        f"a warm restart)" for e in run.get("extensions", [])
    )
    rows = "\n".join(
        f"| {r['guidance_scale']:g} | {r['class_agreement'] * 100:.1f}% | {r['frechet']:.1f} |" for r in figures["rows"]
    )
    pace = " / ".join(f"{q:.2f}" for q in np.percentile(_seconds_per_step(Path(args.out) / "log.jsonl"), [10, 50, 90]))
    return f"""# dit-digits: the embedded class-conditional DiT

A diffusers `DiTTransformer2DModel` in pixel space, loaded by `diffexit.uem.embedded.load_embedded_pipeline()` as a
`DigitsDiTPipeline` (DiT's sampling loop without a VAE). It draws the digits 0..9 at {cfg['image_size']}x{cfg['image_size']}.

- **Architecture.** {cfg['num_layers']} blocks, {cfg['num_heads']} heads x {cfg['head_dim']}, patch {PATCH_SIZE},
  1 channel in and out, adaLN-Zero init; class labels 0..9, null class {NULL_CLASS} (`num_embeds_ada_norm`) for
  classifier-free guidance. {params / 1e6:.2f}M parameters, of which rows 10..999 of the per-block label
  tables (1.5M) are unused zeros. Stored in fp16 ({weights.stat().st_size / 2**20:.1f} MiB); load in float32.
- **Objective.** DDPM epsilon MSE, 1000-step `squaredcos_cap_v2` schedule, labels dropped to the null class
  for 10% of samples (one draw per sample, for all blocks). Shipped sampler: DDIM, "trailing" spacing,
  x0 clipped to [-1, 1].
- **Data.** `sklearn.datasets.load_digits` (1797 images, 8x8, values 0..16), bilinearly upsampled, scaled to
  [-1, 1]; the fixed 1497-image "train" split (`diffexit.uem.digits.load_digits_dataset`).
- **Training.** {progress.step} steps of batch {cfg['batch_size']}, AdamW peak lr {cfg['lr']} (100-step warmup, cosine
  to a tenth), gradient clip {GRAD_CLIP}, EMA decay up to {EMA_MAX_DECAY}; these weights are the EMA. Seed {cfg['seed']},
  {cfg['threads']} CPU thread. {progress.seconds / 60:.0f} min of training on a 2-core CPU machine shared with
  other jobs, at {pace} s/step (10th, 50th, 90th percentile over `log.jsonl`).
- **Commands.** {commands}.

## Quality at full depth

{NUM_CLASSES * args.eval_per_class} samples ({args.eval_per_class} per digit), {args.eval_steps} DDIM steps, one seed per batch of 100
counting up from {args.seed}, judged by the shipped digits classifier (`uem/weights/classifier`,
{figures['classifier_accuracy'] * 100:.1f}% on the held-out real digits). Class agreement: the classifier reads the requested digit. Frechet distance: on the
classifier's 64-d features, against the 300 held-out test digits; {figures['reference_count']} real train digits
score {figures['reference_frechet']:.1f} on the same scale (the distance grows as N shrinks).

| guidance scale | class agreement | Frechet distance |
| --- | --- | --- |
{rows}

The pipeline's default guidance scale is {inspect_default_guidance():g}.
Measured on the shipped fp16 files by `{export_command}`.
"""


def main(argv: Optional[Sequence[str]] = None, prog: str = "diffexit train image") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train the embedded digits DiT (DDPM epsilon, EMA), resumable; --export writes the shipped files.",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"run directory for checkpoints and logs (default {DEFAULT_OUT})")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps in the whole run; with --resume, a larger value extends the run")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step and process")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--num-layers", type=int, default=12)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (part of the run: results depend on it)")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--export", metavar="DIR",
                        help="after training, write the EMA pipeline, measure it and write DIR/MODEL_CARD.md "
                             "(shipped: uem/weights/dit-digits)")
    parser.add_argument("--eval-per-class", type=int, default=30, help="--export: samples per digit to measure")
    parser.add_argument("--eval-steps", type=int, default=50, help="--export: DDIM steps when measuring")
    args = parser.parse_args(argv)
    try:
        _check_args(args)
        command = " ".join([prog, *map(shlex.quote, argv)])
        accelerator, model, ema, progress, run = train(args, command)
    except ValueError as error:
        parser.error(str(error))
    if args.export and accelerator.is_main_process:
        directory = export_pipeline(model, ema, args.export)
        figures = _measure(directory, args)
        (directory / CARD_NAME).write_text(_card(directory, run, progress, figures, command, args))
        print(f"exported the EMA weights at step {progress.step} to {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
