"""``diffexit train image``: train the embedded digits DiT backbone (:mod:`.model`), and export what ships.

The objective is DDPM's epsilon MSE under the model's cosine schedule, with 10% of the labels replaced by the
null class once per sample (the per-block dropout is off, see :mod:`.model`).

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
from ...common.model_card import write_model_card
from ...common.training import EMA, numbered_checkpoints, save_numbered_checkpoint, warmup_cosine
from .data import load_digits_dataset
from .model import NULL_CLASS, build_noise_scheduler, build_sampling_scheduler, build_transformer

DEFAULT_OUT = "runs/dit-digits"
LABEL_DROPOUT = 0.1
WARMUP_STEPS = 100
EMA_MAX_DECAY = 0.9995
GRAD_CLIP = 1.0
KEEP_CHECKPOINTS = 2
# The budget for the shipped run on 2 CPU cores; the trainer prints its own estimate against it.
TIME_BUDGET_MIN = 30
# The hyperparameters that define a run: a resumed run must use the same ones, or it would not be the same run.
RUN_KEYS = ("steps", "batch_size", "lr", "seed", "image_size", "num_layers", "num_heads", "head_dim", "threads")


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
    return peak * warmup_cosine(step, max(1, min(WARMUP_STEPS, steps // 10)), steps)


def checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    return numbered_checkpoints(Path(run_dir) / "checkpoints")


def step_generator(seed: int, process: int, step: int) -> torch.Generator:
    """The generator for all random draws of one training step; a function of (seed, process, step) alone,
    so a resumed run draws exactly what an uninterrupted one would."""
    state = np.random.SeedSequence([seed, process, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class Progress:
    """The step reached and the training seconds spent so far (checkpointed with the model)."""

    def __init__(self):
        self.step = 0
        self.seconds = 0.0

    def state_dict(self) -> dict:
        return {"step": self.step, "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.seconds = int(state["step"]), float(state["seconds"])


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
    ema = EMA(model, EMA_MAX_DECAY)
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
            save_numbered_checkpoint(accelerator, run_dir / "checkpoints", progress.step, KEEP_CHECKPOINTS)
    bar.close()
    return accelerator, unwrapped, ema, progress, run


def export_pipeline(model: nn.Module, ema: EMA, directory: str | Path) -> Path:
    """Write the EMA weights (fp16 safetensors) and the DDIM sampler as a ``DigitsDiTPipeline`` to ``directory``."""
    from .pipeline import DigitsDiTPipeline

    transformer = copy.deepcopy(model).cpu()
    ema.copy_to(transformer)
    pipe = DigitsDiTPipeline(transformer=transformer.half(), scheduler=build_sampling_scheduler())
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return Path(directory)


def main(argv: Optional[Sequence[str]] = None, prog: str = "diffexit train image") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=HelpFormatter,
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
    parser.add_argument("--eval-steps", type=int, default=25,
                        help="--export: DDIM steps when measuring (the shipped card used 50)")
    args = parser.parse_args(argv)
    try:
        _check_args(args)
        command = " ".join([prog, *map(shlex.quote, argv)])
        accelerator, model, ema, progress, run = train(args, command)
    except ValueError as error:
        parser.error(str(error))
    if args.export and accelerator.is_main_process:
        from .card import backbone_card, measure_backbone

        directory = export_pipeline(model, ema, args.export)
        figures = measure_backbone(directory, args.eval_per_class, args.eval_steps, args.seed)
        write_model_card(directory, backbone_card(directory, run, progress.step, progress.seconds, figures, command,
                                                  Path(args.out) / "log.jsonl", grad_clip=GRAD_CLIP,
                                                  ema_decay=EMA_MAX_DECAY))
        print(f"exported the EMA weights at step {progress.step} to {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
