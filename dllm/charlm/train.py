"""``diffexit train text``: train the embedded masked-diffusion text model on the generated tasks.

The objective is LLaDA's / MDLM's. Per example, draw ``t ~ U(eps, 1)`` (stratified over the batch, which
lowers the variance without changing the expectation), mask each answer-span token with probability ``t``
(never the prompt), and take the cross-entropy on the masked tokens weighted by ``1 / t``, summed and divided
by the span length. With probability ``--truncate-prob`` a group's batch is also cut after a random multiple
of ``TRUNCATE_QUANTUM`` positions inside the span, which is what diffusers' ``LLaDA2Pipeline`` shows the model:
the prefix up to the end of the current block, and nothing after it.

Every step trains on one batch per layout, so that short examples never pay for long padding: the short
tasks (``--batch-short`` examples) and the long-form ``count`` (``--batch-long``). ``TASK_SHARES`` sets each task's part:
within a batch its share of the examples, and across layouts its share of the loss (each group's mean loss is
weighted by its tasks' total share). The tasks that need the most examples to learn (fixed-width addition and
the coupled tasks) get more.

Determinism and resuming: the data and masks of step ``s`` are drawn from generators seeded with
``(--seed, s, process index)``, so the step number is the whole random state of the data stream. A checkpoint
(``accelerate``'s ``save_state``: model, optimizer, LR schedule, RNG; plus ``state.json`` with the step and the
elapsed time) is written every ``--checkpoint-every`` steps, and ``--resume`` continues bit for bit.

Reported while training: the loss, and every ``--eval-every`` steps the masked-token accuracy on held-out
examples at a few mask rates (``EVAL_MASK_RATES``). At the end, ``--decode-eval N`` decodes N held-out examples
per task with ``diffexit.dllm.generate`` (greedy, low-confidence) at full steps (``tasks.DECODE``: one token
per step) and at one step, and prints the accuracy of each.

Export: ``--export DIR`` writes ``model.safetensors`` (fp16), ``config.json``, ``tokenizer.json`` and
``training.json`` (the command, seed, steps and time), loadable by
``diffexit.dllm.charlm.model.load_text_model``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ...common.cli_help import HelpFormatter
from ...common.model_card import model_card, write_model_card
from ...common.training import save_checkpoint, warmup_cosine
from .tasks import DECODE, LAYOUTS, TASK_NAMES, TASKS, Example, Layout, sample, score
from .model import DiffusionLlama, load_text_model, text_model_config
from .tokenizer import build_tokenizer, decode_answer, encode_answers, encode_prompts

MASK_EPS = 1e-3
TRUNCATE_QUANTUM = 4  # pipelines' block lengths are multiples of this, so their windows end on such positions
EVAL_MASK_RATES = (0.15, 0.5, 1.0)
EVAL_EXAMPLES = 64
# Relative weight of each task in the data and the loss.
TASK_SHARES = {"add": 3, "sort": 1, "reverse": 1, "count": 2, "sum_pair": 2, "permute": 3, "spell": 3}
SHORT_TASKS = tuple(t for t in TASK_NAMES if TASKS[t].layout == "short")
LONG_TASKS = tuple(t for t in TASK_NAMES if TASKS[t].layout == "long")
# Arguments that change the trajectory: a resumed run must use the same values.
RUN_KEYS = ("seed", "steps", "lr", "warmup", "weight_decay", "batch_short", "batch_long", "truncate_prob",
            "hidden", "layers", "heads")


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="run directory: checkpoint, state.json, metrics.jsonl")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--export", metavar="DIR", help="after training, write the shipped model files to DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3500, help="optimizer steps in the whole run")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps before the cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--batch-short", type=int, default=96, help="short-task examples per step (tasks in turn)")
    p.add_argument("--batch-long", type=int, default=8, help="long-form (count) examples per step")
    p.add_argument("--truncate-prob", type=float, default=0.25,
                   help="chance that a batch is cut after a block boundary inside the span")
    p.add_argument("--hidden", type=int, default=128, help="model width")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=200, help="steps between held-out masked-token accuracies")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--decode-eval", type=int, default=0, metavar="N",
                   help="after training, decode N held-out examples per task at full steps and at one step")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return p


def _check_args(args: argparse.Namespace) -> None:
    positive = ("steps", "lr", "batch_short", "hidden", "layers", "heads", "eval_every", "checkpoint_every")
    for name in positive:
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("warmup", "weight_decay", "batch_long", "decode_eval"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0.0 <= args.truncate_prob <= 1.0:
        raise ValueError(f"--truncate-prob must be in [0, 1], got {args.truncate_prob}")
    short_shares = sum(TASK_SHARES[t] for t in SHORT_TASKS)
    if args.batch_short < short_shares:
        raise ValueError(f"--batch-short must be at least {short_shares} (the short tasks' total share), so that "
                         f"every short task is in each step")
    if args.threads is not None and args.threads <= 0:
        raise ValueError(f"--threads must be positive, got {args.threads}")


def encode_examples(tokenizer, examples: list[Example], layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt (left-padded) + answer + EOS padding: ``(input_ids, attention_mask)``, int64 ``[B, layout.seq_length]``."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [e.prompt for e in examples], layout.prompt_length)
    span = encode_answers(tokenizer, [e.answer for e in examples], layout.span_length)
    return torch.cat([prompt_ids, span], 1), torch.cat([prompt_mask, torch.ones_like(span)], 1)


def split_counts(total: int, tasks: tuple[str, ...]) -> dict[str, int]:
    """``total`` examples split over ``tasks`` in proportion to ``TASK_SHARES`` (largest remainders round up)."""
    shares = sum(TASK_SHARES[t] for t in tasks)
    exact = {t: total * TASK_SHARES[t] / shares for t in tasks}
    counts = {t: int(exact[t]) for t in tasks}
    for t in sorted(tasks, key=lambda t: counts[t] - exact[t])[: total - sum(counts.values())]:
        counts[t] += 1
    return counts


def step_examples(step: int, seed: int, rank: int, batch_short: int, batch_long: int) -> dict[str, list[Example]]:
    """The training examples of ``step`` on process ``rank``, per layout (``"short"``, and ``"long"`` if any)."""
    data_seed = (seed * 1_000_003 + step) * 1_009 + rank
    counts = split_counts(batch_short, SHORT_TASKS)
    per_task = {t: sample(t, "train", data_seed, counts[t]) for t in SHORT_TASKS}
    # Interleave the tasks, so that the stratified mask rates (by batch index) spread over every task.
    groups = {"short": [per_task[t][i] for i in range(max(counts.values())) for t in SHORT_TASKS if i < counts[t]]}
    if batch_long:
        counts = split_counts(batch_long, LONG_TASKS)
        groups["long"] = [ex for t in LONG_TASKS for ex in sample(t, "train", data_seed, counts[t])]
    return groups


def corrupt(input_ids: torch.Tensor, prompt_length: int, t: torch.Tensor, mask_id: int, generator: torch.Generator):
    """Mask each span token (positions >= ``prompt_length``) with probability ``t`` ``[B]``.

    Returns ``(noisy_ids, masked)``: ``[B, N]`` int64 and bool.
    """
    draw = torch.rand(input_ids.shape, generator=generator)
    masked = draw < t[:, None]
    masked[:, :prompt_length] = False
    return torch.where(masked, torch.full_like(input_ids, mask_id), input_ids), masked


def diffusion_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
                   span_length: int) -> torch.Tensor:
    """Sum over the batch of ``sum_masked CE / t`` per example divided by its span length (a scalar)."""
    ce = F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")
    weights = (1.0 / t)[:, None].expand_as(masked)[masked]
    return (ce * weights).sum() / span_length


def training_loss(model, tokenizer, step: int, args, rank: int) -> torch.Tensor:
    """The loss of training step ``step`` (a scalar to call ``backward`` on).

    Each layout group's loss is its per-example mean, weighted by its tasks' share of ``TASK_SHARES``.
    """
    gen = torch.Generator().manual_seed((args.seed * 1_000_003 + step) * 1_009 + rank)
    device = next(model.parameters()).device
    groups = step_examples(step, args.seed, rank, args.batch_short, args.batch_long)
    shares = {g: sum(TASK_SHARES[t] for t in TASK_NAMES if TASKS[t].layout == g) for g in groups}
    total = 0.0
    for group, examples in groups.items():
        layout = LAYOUTS[group]
        ids, attn = encode_examples(tokenizer, examples, layout)
        batch = len(examples)
        # Stratified t: one uniform offset, batch-many evenly spaced points, all in [eps, 1).
        u = (torch.rand(1, generator=gen) + torch.arange(batch) / batch) % 1.0
        t = MASK_EPS + (1 - MASK_EPS) * u
        length = layout.seq_length
        if torch.rand(1, generator=gen).item() < args.truncate_prob:
            cuts = [c for c in range(layout.prompt_length + 1, layout.seq_length) if c % TRUNCATE_QUANTUM == 0]
            length = cuts[int(torch.randint(len(cuts), (1,), generator=gen))]
        ids, attn = ids[:, :length], attn[:, :length]
        noisy, masked = corrupt(ids, layout.prompt_length, t, tokenizer.mask_token_id, gen)
        logits = model(noisy.to(device), attention_mask=attn.to(device)).logits
        loss = diffusion_loss(logits, ids.to(device), masked.to(device), t.to(device), length - layout.prompt_length)
        total = total + loss / batch * (shares[group] / sum(shares.values()))
    return total


@torch.no_grad()
def masked_accuracy(model, tokenizer, heldout: dict[str, list[Example]]) -> dict[str, dict[float, float]]:
    """Per task and mask rate, the argmax accuracy on masked span tokens of held-out examples (fixed masks)."""
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, dict[float, float]] = {}
    for ti, (task, examples) in enumerate(heldout.items()):
        layout = LAYOUTS[TASKS[task].layout]
        ids, attn = encode_examples(tokenizer, examples, layout)
        out[task] = {}
        for ri, rate in enumerate(EVAL_MASK_RATES):
            gen = torch.Generator().manual_seed(1_000 * ti + ri)
            noisy, masked = corrupt(ids, layout.prompt_length, torch.full((len(examples),), rate),
                                    tokenizer.mask_token_id, gen)
            pred = model(noisy.to(device), attention_mask=attn.to(device)).logits.argmax(-1).cpu()
            out[task][rate] = float((pred[masked] == ids[masked]).float().mean()) if masked.any() else float("nan")
    model.train()
    return out


@torch.no_grad()
def decode_accuracy(model, tokenizer, task: str, examples: list[Example], *, one_step: bool, batch: int = 64) -> float:
    """Fraction of ``examples`` that ``diffexit.dllm.generate`` gets right, greedy with low-confidence remasking.

    Full steps use the span's ``DECODE`` setup (one token per step); ``one_step`` fills the span in one pass.
    """
    from ..generate import generate

    layout = LAYOUTS[TASKS[task].layout]
    block, steps = (layout.span_length, 1) if one_step else DECODE[layout.span_length]
    model.eval()
    device = next(model.parameters()).device
    right = 0
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        ids, attn = encode_prompts(tokenizer, [e.prompt for e in chunk], layout.prompt_length)
        out = generate(model, ids.to(device), attention_mask=attn.to(device), gen_length=layout.span_length,
                       steps=steps, block_length=block, mask_id=tokenizer.mask_token_id)
        for e, span in zip(chunk, out.generated.cpu()):
            right += score(task, e.prompt, decode_answer(tokenizer, span))
    return right / len(examples)


def export(model: DiffusionLlama, tokenizer, directory: Path, record: dict) -> None:
    """Write fp16 ``model.safetensors`` + ``config.json``, the tokenizer files and ``training.json`` to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).half().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "training.json").write_text(json.dumps(record, indent=1) + "\n")


def _format_accuracy(acc: dict[str, dict[float, float]]) -> str:
    return " ".join(f"{task}=" + "/".join(f"{v:.2f}" for v in rates.values()) for task, rates in acc.items())


def main(argv: list[str], prog: str = "diffexit train text") -> int:
    args = _parser(prog).parse_args(argv)
    _check_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    out = Path(args.out)
    run = {k: getattr(args, k) for k in RUN_KEYS}
    ckpt = out / "checkpoint"
    if args.resume:
        if not (ckpt / "state.json").is_file():
            raise ValueError(f"--resume: no checkpoint in {ckpt}; start the run without --resume")
        state = json.loads((ckpt / "state.json").read_text())
        changed = {k: (state["run"][k], v) for k, v in run.items() if state["run"].get(k) != v}
        if changed:
            raise ValueError(f"--resume with different settings {changed} (saved, given); rerun with the saved "
                             f"values, or start a new run in another --out")
    elif ckpt.exists():
        raise ValueError(f"{ckpt} already exists; pass --resume to continue that run, or choose another --out")

    accelerator = Accelerator()
    tokenizer = build_tokenizer()
    max_positions = max(layout.seq_length for layout in LAYOUTS.values())
    torch.manual_seed(args.seed)
    model = DiffusionLlama(text_model_config(len(tokenizer), tokenizer.pad_token_id, hidden_size=args.hidden,
                                             num_layers=args.layers, num_heads=args.heads,
                                             max_positions=max_positions))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, args.warmup, args.steps))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    start, elapsed = 0, 0.0
    if args.resume:
        accelerator.load_state(str(ckpt))
        start, elapsed = state["step"], state["elapsed_s"]
    out.mkdir(parents=True, exist_ok=True)
    heldout = {t: sample(t, "heldout", 0, EVAL_EXAMPLES) for t in TASK_NAMES}
    n_params = sum(p.numel() for p in model.parameters())
    if accelerator.is_main_process:
        print(f"{prog}: {n_params / 1e6:.2f}M parameters, steps {start}->{args.steps}, seed {args.seed}, "
              f"{accelerator.num_processes} process(es) on {accelerator.device}", file=sys.stderr)

    model.train()
    bar = tqdm(total=args.steps, initial=start, disable=not accelerator.is_local_main_process, desc="train text")
    t0 = time.perf_counter()
    log = out / "metrics.jsonl"
    for step in range(start, args.steps):
        loss = training_loss(model, tokenizer, step, args, accelerator.process_index)
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
            if done % args.eval_every == 0 or done == args.steps:
                acc = masked_accuracy(accelerator.unwrap_model(model), tokenizer, heldout)
                record["masked_accuracy"] = acc
                bar.write(f"step {done} loss {record['loss']:.4f} | held-out masked acc at t={EVAL_MASK_RATES}: "
                          f"{_format_accuracy(acc)}")
            record["elapsed_s"] = elapsed + time.perf_counter() - t0
            with log.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if done % args.checkpoint_every == 0 or done == args.steps:
            state = {"step": done, "elapsed_s": elapsed + time.perf_counter() - t0, "run": run}
            save_checkpoint(accelerator, ckpt, {"state.json": json.dumps(state, indent=1)})
    bar.close()
    elapsed += time.perf_counter() - t0

    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        print(f"{prog}: {args.steps} steps, {elapsed / 60:.1f} min of training in total", file=sys.stderr)
        if args.export:
            export(unwrapped, tokenizer, Path(args.export), {
                "command": f"{prog} " + " ".join(argv), "seed": args.seed, "steps": args.steps,
                "train_minutes": round(elapsed / 60, 1), "parameters": n_params, "run": run,
                "tasks": list(TASK_NAMES), "task_shares": TASK_SHARES,
                "layouts": {k: vars(v) for k, v in LAYOUTS.items()},
            })
            print(f"{prog}: exported to {args.export}", file=sys.stderr)
        if args.decode_eval:
            # Score what ships: the exported fp16 weights, when there are any.
            scored = load_text_model(args.export)[0] if args.export else unwrapped
            lines = ["| task | full steps | one step |", "| --- | --- | --- |"]
            print("\n".join(lines))
            for task in tqdm(TASK_NAMES, desc="decode eval", disable=not accelerator.is_local_main_process):
                examples = sample(task, "heldout", 0, args.decode_eval)
                full = decode_accuracy(scored, tokenizer, task, examples, one_step=False)
                one = decode_accuracy(scored, tokenizer, task, examples, one_step=True)
                lines.append(f"| {task} | {full:.3f} | {one:.3f} |")
                print(lines[-1], flush=True)
            if args.export:
                write_text_card(Path(args.export), f"{prog} " + " ".join(argv), args, n_params, elapsed, lines)
    return 0


def write_text_card(directory: Path, command: str, args, n_params: int, seconds: float, table: list[str]) -> None:
    """``MODEL_CARD.md`` beside the exported weights: how they were made and their held-out decoding accuracy."""
    resumed = " (the last leg of a run resumed from its checkpoints; resuming continues bit for bit)" if args.resume else ""
    card = model_card(
        "The embedded masked-diffusion text model",
        f"""A bidirectional `LlamaForCausalLM` (`DiffusionLlama`: `is_causal=False`, learned absolute positions),
{args.layers} layers x {args.hidden} wide, {args.heads} heads, {n_params / 1e6:.2f}M parameters, stored in fp16; a
character-level tokenizer (`tokenizer.json`, `[MASK]`, `[EOS]`, `[PAD]`). Load it with
`diffexit.dllm.charlm.model.load_embedded_text_model()`.""",
        {
            "Data": f"""The generated tasks of `diffexit.dllm.charlm.tasks` ({", ".join(TASK_NAMES)}), training split (a
  CRC32 of the prompt decides the split, so held-out prompts are never trained on).""",
            "Objective": """LLaDA's masked-diffusion loss: `t ~ U(eps, 1)`, each answer-span token masked with
  probability `t`, cross-entropy on the masked tokens weighted by `1/t`; a quarter of the batches cut after a block
  boundary so the model also decodes in `LLaDA2Pipeline`'s block windows.""",
            "Training": f"""{args.steps} steps, AdamW peak lr {args.lr:g} ({args.warmup} warm-up steps, cosine decay),
  batches of {args.batch_short} short and {args.batch_long} long examples, seed {args.seed}, {seconds / 60:.0f} min on a
  2-core CPU shared with other jobs. `training.json` has the full settings.""",
            "Command": f"`{command}`{resumed}.",
        },
        [("Held-out accuracy", f"""{args.decode_eval} held-out examples per task, greedy, low-confidence remasking; "full steps"
commits one token per step (short spans: one block of 16; `count`: 4 blocks of 34), "one step" fills the span in one
forward pass. Coupled tasks (`sum_pair`, `permute`, `spell`) are scored for validity, the others for equality.

{chr(10).join(table)}""")],
    )
    write_model_card(directory, card)
