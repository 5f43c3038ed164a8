"""``diffexit train text``: train the embedded masked-diffusion text model on the generated tasks.

``--arch llama`` (the default) trains the bidirectional Llama with LLaDA's masked diffusion (:mod:`.objective`);
``--arch diffusion-gemma`` trains a small ``DiffusionGemmaForBlockDiffusion`` (:mod:`.gemma`) with the uniform
corruption and self-conditioning its sampler implies (:mod:`.gemma_objective`). Both see each step's examples from
:mod:`.data`.

Determinism and resuming: the data and masks of step ``s`` are drawn from generators seeded with ``(--seed, s,
process index)``, so the step number is the whole random state of the data stream. A checkpoint (``accelerate``'s
``save_state``: model, optimizer, LR schedule, RNG; plus ``state.json`` with the step, the time and the run's
settings) is written atomically every ``--checkpoint-every`` steps, and ``--resume`` continues bit for bit, even after
a kill (the metrics logged after the last checkpoint are dropped, then logged again). A run can
go on in legs: ``--resume --steps N`` with a larger N extends it, the cosine stretched to N from the newest
checkpoint (a warm restart; ``state.json`` records each leg).

Reported while training: the loss; every ``--eval-every`` steps the held-out masked-token accuracy at a few mask
rates; and every ``--decode-every`` steps the decoding accuracy of ``--decode-n`` held-out prompts per task at
full steps and at one step (for tasks with several valid answers, the only signal that they are being learned).
``metrics.jsonl`` keeps all of it.

Export: ``--export DIR`` writes ``model.safetensors`` (fp16), ``config.json``, ``tokenizer.json`` and
``training.json``, loadable by ``diffexit.dllm.charlm.model.load_text_model``; ``--decode-eval N`` then measures the
exported weights on N held-out examples per task and writes ``DIR/MODEL_CARD.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from ...common.cli_help import HelpFormatter
from ...common.results import atomic_write_bytes
from ...common.training import restore_checkpoint, save_checkpoint, warmup_cosine
from .data import SHORT_TASKS, TASK_SHARES
from .evaluate import (
    EVAL_MASK_RATES,
    decode_table,
    format_accuracy,
    format_decodes,
    masked_accuracy,
    write_text_card,
)
from .block_objective import block_training_loss
from .model import WEIGHTS_DIR, DiffusionLlama, load_text_model, text_model_config
from .objective import training_loss
from .tasks import LAYOUTS, TASK_NAMES, sample
from .tokenizer import build_tokenizer

ARCHS = ("llama", "diffusion-gemma")
# What a run checkpointed before --arch and --experts existed was trained with.
SETTINGS_BEFORE_ARCH = {"arch": "llama", "experts": 2, "block_length": None, "init_from": None}

EVAL_EXAMPLES = 64
# Arguments that change the trajectory: a resumed run must use the same values (`steps` may grow: a new leg).
RUN_KEYS = ("arch", "seed", "lr", "warmup", "weight_decay", "batch_short", "batch_long", "truncate_prob", "hidden",
            "layers", "heads", "experts", "block_length", "init_from")


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="run directory: checkpoint, metrics.jsonl")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--export", metavar="DIR", help="after training, write the shipped model files to DIR")
    p.add_argument("--arch", choices=ARCHS, default="llama",
                   help="llama: the bidirectional Llama (LLaDA's objective); diffusion-gemma: a small "
                        "DiffusionGemmaForBlockDiffusion (uniform corruption, self-conditioning)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=4000,
                   help="optimizer steps in the whole run; with --resume, a larger value adds a leg")
    p.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps before the cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--batch-short", type=int, default=96, help="short-task examples per step (tasks in turn)")
    p.add_argument("--batch-long", type=int, default=8, help="long-form (chain) examples per step")
    p.add_argument("--truncate-prob", type=float, default=0.25,
                   help="chance that a batch is cut after a block boundary inside the span")
    p.add_argument("--hidden", type=int, default=256, help="model width")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--block-length", type=int,
                   help="llama: train a block-causal model with blocks of this many span positions (the block "
                        "diffusion objective); default: bidirectional")
    p.add_argument("--init-from", metavar="DIR",
                   help="llama: start from an exported model's weights (a folder, or 'charlm' for the shipped "
                        "model); with --block-length this converts a bidirectional model to block-causal")
    p.add_argument("--experts", type=int, default=2, help="diffusion-gemma: experts per layer (one active)")
    p.add_argument("--eval-every", type=int, default=200, help="steps between held-out masked-token accuracies")
    p.add_argument("--decode-every", type=int, default=500,
                   help="steps between held-out decoding accuracies, full steps and one step (0: never)")
    p.add_argument("--decode-n", type=int, default=16, help="held-out prompts per task in those decodes")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--decode-eval", type=int, default=0, metavar="N",
                   help="after training, decode N held-out examples per task at full steps and at one step")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return p


def _check_args(args: argparse.Namespace) -> None:
    for name in ("lr", "weight_decay", "truncate_prob"):
        if not math.isfinite(getattr(args, name)):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)}")
    positive = ("steps", "lr", "batch_short", "hidden", "layers", "heads", "experts", "eval_every",
                "checkpoint_every", "decode_n")
    for name in positive:
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("warmup", "weight_decay", "batch_long", "decode_eval", "decode_every"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.warmup > args.steps:
        raise ValueError(f"--warmup {args.warmup} is longer than the run's --steps {args.steps}; pass at most that")
    if not 0.0 <= args.truncate_prob <= 1.0:
        raise ValueError(f"--truncate-prob must be in [0, 1], got {args.truncate_prob}")
    short_shares = sum(TASK_SHARES[t] for t in SHORT_TASKS)
    if args.batch_short < short_shares:
        raise ValueError(f"--batch-short must be at least {short_shares} (the short tasks' total share), so that "
                         f"every short task is in each step")
    if args.threads is not None and args.threads <= 0:
        raise ValueError(f"--threads must be positive, got {args.threads}")
    if args.block_length is not None and args.block_length <= 0:
        raise ValueError(f"--block-length must be positive, got {args.block_length}")
    if args.arch != "llama" and (args.block_length is not None or args.init_from is not None):
        raise ValueError("--block-length and --init-from are options of --arch llama")
    if args.init_from is not None and args.init_from != "charlm" and not (Path(args.init_from) / "config.json").is_file():
        raise ValueError(f"--init-from {args.init_from}: no exported model there (config.json); pass a folder that "
                         f"`diffexit train text --export` wrote, or 'charlm' for the shipped model")
    if args.hidden % args.heads:
        raise ValueError(f"--hidden {args.hidden} must be a multiple of --heads {args.heads}")
    for flag, path in (("--out", Path(args.out)), ("--export", args.export and Path(args.export))):
        if path and path.exists() and not path.is_dir():
            raise ValueError(f"{flag} {path} is a file; pass a folder")


def _build(args):
    """``(model, tokenizer, loss_fn, decode_fn, load_fn)`` of ``args.arch``."""
    max_positions = max(layout.seq_length for layout in LAYOUTS.values())
    if args.arch == "llama":
        tokenizer = build_tokenizer()
        config = text_model_config(len(tokenizer), tokenizer.pad_token_id, hidden_size=args.hidden,
                                   num_layers=args.layers, num_heads=args.heads, max_positions=max_positions,
                                   block_length=args.block_length)
        if args.init_from is None:
            model = DiffusionLlama(config)
        else:
            source = WEIGHTS_DIR if args.init_from == "charlm" else Path(args.init_from)
            model = DiffusionLlama.from_pretrained(source, config=config, dtype=torch.float32)
        loss = training_loss if args.block_length is None else block_training_loss
        return model, tokenizer, loss, decode_table, load_text_model
    from .gemma import (CANVAS_LENGTH, chat_tokenizer, gemma_config, gemma_decode_table, gemma_span, load_gemma_model,
                        new_gemma_model)
    from .gemma_objective import gemma_training_loss

    tokenizer = chat_tokenizer()
    model = new_gemma_model(gemma_config(
        tokenizer, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
        head_dim=args.hidden // args.heads, num_experts=args.experts,
        max_positions=max(gemma_span(layout, CANVAS_LENGTH) + layout.prompt_length for layout in LAYOUTS.values())))
    return model, tokenizer, gemma_training_loss, gemma_decode_table, load_gemma_model


def schedule_totals(legs: list[dict]):
    """Step -> the run length its learning rate follows: each leg stretches the cosine to its own end from the step
    it began at (a warm restart), and earlier steps keep theirs, so resuming from any checkpoint retraces them."""
    return lambda step: [leg["steps"] for leg in legs if leg["from_step"] <= step][-1]


def export(model: DiffusionLlama, tokenizer, directory: Path, record: dict) -> None:
    """Write fp16 ``model.safetensors`` + ``config.json``, the tokenizer files and ``training.json`` to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).half().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "training.json").write_text(json.dumps(record, indent=1) + "\n")


def _resume_state(args, ckpt: Path, run: dict, command: str) -> tuple[dict, list[dict]]:
    """``(state, legs)`` of the checkpointed run, checked against the arguments; a larger ``--steps`` adds a leg."""
    if not (restore_checkpoint(ckpt) / "state.json").is_file():
        raise ValueError(f"--resume: no checkpoint in {ckpt}; start the run without --resume")
    state = json.loads((ckpt / "state.json").read_text())
    saved = {**SETTINGS_BEFORE_ARCH, **state["run"]}
    changed = {k: (saved.get(k), v) for k, v in run.items() if saved.get(k) != v}
    if changed:
        raise ValueError(f"--resume with different settings {changed} (saved, given); rerun with the saved "
                         f"values, or start a new run in another --out")
    legs = state["legs"]
    if args.steps < legs[-1]["steps"]:
        raise ValueError(f"--steps {args.steps} is below the run's {legs[-1]['steps']}; pass at least that")
    if args.steps > legs[-1]["steps"]:
        legs = legs + [{"from_step": state["step"], "steps": args.steps, "command": command}]
    return state, legs


def _keep_metrics_until(log: Path, step: int) -> None:
    """Drop the records a killed run logged after its last checkpoint (the resumed run logs those steps again),
    and a line the kill cut short."""
    if not log.is_file():
        return
    kept = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= step:
            kept.append(line + "\n")
    atomic_write_bytes(log, "".join(kept).encode())


def main(argv: list[str], prog: str = "diffexit train text") -> int:
    parser = _parser(prog)
    args = parser.parse_args(argv)
    out = Path(args.out)
    command = " ".join([prog, *map(shlex.quote, argv)])
    run = {k: getattr(args, k) for k in RUN_KEYS}
    ckpt = out / "checkpoint"
    try:
        _check_args(args)
        if args.resume:
            state, legs = _resume_state(args, ckpt, run, command)
        elif restore_checkpoint(ckpt).exists():
            raise ValueError(f"{ckpt} already exists; pass --resume to continue that run, or choose another --out")
        else:
            legs = [{"from_step": 0, "steps": args.steps, "command": command}]
    except ValueError as e:
        parser.error(str(e))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    accelerator = Accelerator()
    torch.manual_seed(args.seed)
    model, tokenizer, loss_fn, decode_fn, load_fn = _build(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    totals = schedule_totals(legs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, args.warmup, totals(s)))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    start, elapsed = 0, 0.0
    out.mkdir(parents=True, exist_ok=True)
    log = out / "metrics.jsonl"
    if args.resume:
        accelerator.load_state(str(ckpt))
        start, elapsed = state["step"], state["elapsed_s"]
        if accelerator.is_main_process:
            _keep_metrics_until(log, start)
    heldout = {t: sample(t, "heldout", 0, EVAL_EXAMPLES) for t in TASK_NAMES}
    n_params = sum(p.numel() for p in model.parameters())
    if accelerator.is_main_process:
        print(f"{prog}: {n_params / 1e6:.2f}M parameters, steps {start}->{args.steps}, seed {args.seed}, "
              f"{accelerator.num_processes} process(es) on {accelerator.device}", file=sys.stderr)

    model.train()
    bar = tqdm(total=args.steps, initial=start, disable=not accelerator.is_local_main_process, desc="train text")
    t0 = time.perf_counter()
    for step in range(start, args.steps):
        loss = loss_fn(model, tokenizer, step, args, accelerator.process_index)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        record = {"step": done, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]}
        if accelerator.is_main_process:
            if args.arch == "llama" and (done % args.eval_every == 0 or done == args.steps):
                acc = masked_accuracy(accelerator.unwrap_model(model), tokenizer, heldout)
                record["masked_accuracy"] = acc
                bar.write(f"step {done} loss {record['loss']:.4f} | held-out masked acc at t={EVAL_MASK_RATES}: "
                          f"{format_accuracy(acc)}")
            if args.decode_every and (done % args.decode_every == 0 or done == args.steps):
                record["decode"] = decode_fn(accelerator.unwrap_model(model), tokenizer, args.decode_n)
                bar.write(f"step {done} | held-out decoding, full steps/one step: {format_decodes(record['decode'])}")
            record["elapsed_s"] = elapsed + time.perf_counter() - t0
            with log.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if done % args.checkpoint_every == 0 or done == args.steps:
            state = {"step": done, "elapsed_s": elapsed + time.perf_counter() - t0, "run": run, "legs": legs}
            save_checkpoint(accelerator, ckpt, {"state.json": json.dumps(state, indent=1)})
    bar.close()
    elapsed += time.perf_counter() - t0

    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        print(f"{prog}: {args.steps} steps, {elapsed / 60:.1f} min of training in total", file=sys.stderr)
        if args.export:
            export(unwrapped, tokenizer, Path(args.export), {
                "command": legs[0]["command"], "legs": legs, "seed": args.seed, "steps": args.steps,
                "train_minutes": round(elapsed / 60, 1), "parameters": n_params, "run": run,
                "tasks": list(TASK_NAMES), "task_shares": TASK_SHARES,
                "layouts": {k: vars(v) for k, v in LAYOUTS.items()},
            })
            print(f"{prog}: exported to {args.export}", file=sys.stderr)
        if args.decode_eval:
            # Score what ships: the exported fp16 weights, when there are any.
            scored = load_fn(args.export)[0] if args.export else unwrapped
            table = decode_fn(scored, tokenizer, args.decode_eval)
            for task, v in table.items():
                print(f"| {task} | {v['full']:.3f} | {v['one_step']:.3f} |", flush=True)
            if args.export:
                write_text_card(Path(args.export), legs[0]["command"], args, n_params, elapsed, table,
                                args.decode_eval, [leg["command"] for leg in legs[1:]])
    return 0
