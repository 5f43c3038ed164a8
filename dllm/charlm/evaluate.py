"""How well an embedded text model does: held-out masked-token accuracy, and decoding accuracy at full steps and at
one step, which is what tells a discriminating task from a control (masked accuracy against one reference answer
cannot show a task with several valid answers being learned). And the model's card.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ...common.model_card import model_card, write_model_card
from .data import TASK_SHARES, encode_examples
from ..exact_cache import block_causal_layout
from .objective import corrupt
from .tasks import CONTROLS, DECODE, LAYOUTS, TASK_NAMES, TASKS, Example, sample, score
from .tokenizer import decode_answer, encode_prompts

EVAL_MASK_RATES = (0.15, 0.5, 1.0)


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

    Full steps use the span's ``DECODE`` setup (one token per step); ``one_step`` fills the span in one pass. A
    block-causal model decodes in its own blocks, one token per step or (``one_step``) one step per block.
    """
    from ..generate import generate

    layout = LAYOUTS[TASKS[task].layout]
    block, steps = (layout.span_length, 1) if one_step else DECODE[layout.span_length]
    block_causal = block_causal_layout(model)
    if block_causal is not None:
        # A block-causal model decodes in its own blocks: one token per step, or one step per block.
        block = block_causal[1]
        steps = layout.span_length // block if one_step else layout.span_length
    was_training = model.training
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
    model.train(was_training)
    return right / len(examples)


def decode_table(model, tokenizer, n: int, tasks: Sequence[str] = TASK_NAMES, seed: int = 0) -> dict[str, dict]:
    """``{task: {"full": accuracy, "one_step": accuracy}}`` on ``n`` held-out examples of each task (draw ``seed``)."""
    out = {}
    for task in tasks:
        examples = sample(task, "heldout", seed, n)
        out[task] = {"full": decode_accuracy(model, tokenizer, task, examples, one_step=False),
                     "one_step": decode_accuracy(model, tokenizer, task, examples, one_step=True)}
    return out


def format_decodes(table: dict[str, dict]) -> str:
    return " ".join(f"{task}={v['full']:.2f}/{v['one_step']:.2f}" for task, v in table.items())


def format_accuracy(acc: dict[str, dict[float, float]]) -> str:
    return " ".join(f"{task}=" + "/".join(f"{v:.2f}" for v in rates.values()) for task, rates in acc.items())


def accuracy_table(table: dict[str, dict]) -> str:
    """The card's markdown table: full-step and one-step accuracy per task, and which tasks are controls."""
    lines = ["| task | full steps | one step | role |", "| --- | --- | --- | --- |"]
    for task, v in table.items():
        role = "control" if task in CONTROLS else "discriminating"
        lines.append(f"| {task} | {v['full']:.3f} | {v['one_step']:.3f} | {role} |")
    return "\n".join(lines)


def write_text_card(directory: Path, command: str, args, n_params: int, seconds: float, table: dict[str, dict],
                    n: int, legs: Sequence[str] = ()) -> None:
    """``MODEL_CARD.md`` beside the exported weights: how they were made and their held-out decoding accuracy."""
    shares = ", ".join(f"{t} {s}" for t, s in TASK_SHARES.items())
    commands = "".join(f", then `{c}`" for c in legs)
    if getattr(args, "arch", "llama") == "llama" and getattr(args, "block_length", None):
        title = "The embedded block-causal text model (charlm-block)"
        about = f"""A block-causal `LlamaForCausalLM` (`DiffusionLlama` with `block_length={args.block_length}`: the
24-position prompt is block 0, bidirectional within itself; each {args.block_length}-token answer block attends to the
prompt, the earlier blocks and itself, never to a later block), {args.layers} layers x {args.hidden} wide,
{args.heads} heads, {n_params / 1e6:.2f}M parameters, stored in fp16; the character-level tokenizer of the
bidirectional model. The K/V of the prompt and of every finished block never change, so `cache="prefix"` is exact
(`diffexit.dllm.exact_cache`). Load it with `diffexit.dllm.charlm.model.load_text_model(BLOCK_WEIGHTS_DIR)`."""
        objective = f"""Block diffusion, converted from the shipped bidirectional model (`--init-from
  {args.init_from}`): the clean sequence and a noisy copy of its span in one pass, each block of the copy masked at
  its own rate `t ~ U(eps, 1)`, cross-entropy on the masked tokens weighted by `1/t`
  (`diffexit.dllm.charlm.block_objective`)."""
        initialization = {}
        decoding = f"""greedy, low-confidence remasking, in the model's own blocks of {args.block_length}; "full
steps" commits one token per step, "one step" one step per block"""
    elif getattr(args, "arch", "llama") == "llama":
        title = "The embedded masked-diffusion text model"
        about = f"""A bidirectional `LlamaForCausalLM` (`DiffusionLlama`: `is_causal=False`, learned absolute positions),
{args.layers} layers x {args.hidden} wide, {args.heads} heads, {n_params / 1e6:.2f}M parameters, stored in fp16; a
character-level tokenizer (`tokenizer.json`, `[MASK]`, `[EOS]`, `[PAD]`). Load it with
`diffexit.dllm.charlm.model.load_embedded_text_model()`."""
        objective = """LLaDA's masked-diffusion loss: `t ~ U(eps, 1)`, each answer-span token masked with
  probability `t`, cross-entropy on the masked tokens weighted by `1/t`; a quarter of the batches cut after a block
  boundary so the model also decodes in `LLaDA2Pipeline`'s block windows."""
        initialization = {}
        decoding = """greedy, low-confidence remasking; "full steps"
commits one token per step (short spans: 4 blocks of 4; `chain`: 4 blocks of 34), "one step" fills the span in one
forward pass"""
    else:
        title = "The embedded DiffusionGemma text model"
        about = f"""A `DiffusionGemmaForBlockDiffusion` (transformers' own class: a causal encoder over the prompt and
the canvases before, a bidirectional decoder over a 16-token canvas), {args.layers} layers x {args.hidden} wide,
{args.heads} heads, {args.experts} experts per layer (one active), a one-layer 16-wide vision tower the tasks never
use; {n_params / 1e6:.2f}M parameters, stored in fp16; the character-level tokenizer with a pass-through chat
template. Load it with `DiffusionGemmaForBlockDiffusion.from_pretrained`; it runs in its own `generate` and in
diffusers' `DiffusionGemmaPipeline` through `SchEDDiffusionGemmaPipeline` (whose `__call__` also runs on transformers
5.24 and later, where the stock one raises `TypeError`)."""
        objective = """What the model's sampler implies (`diffexit.dllm.charlm.gemma_objective`): each canvas
  token redrawn uniformly from the vocabulary with probability `t ~ U(eps, 1)`, cross-entropy against the clean
  canvas at every position; self-conditioning as the modeling code trains it, for half of the examples a first pass
  without it (no gradient) whose raw logits the second pass reads through `self_conditioning_logits`, for the
  others `self_conditioning_mask=False`. At inference the logits fed back are temperature-scaled (0.8 to 0.4); in
  training they are raw. `chain`'s span is nine canvases; each step trains one, after the clean ones before it."""
        initialization = {"Initialization": """transformers' own, except the query and key norms' scales, which start
  at `head_dim ** -0.25` (`new_gemma_model`): Gemma does not divide attention logits by `sqrt(head_dim)`, and with
  those scales at 1 the same recipe never learned to use the canvas for a choice (docs/design.md)."""}
        decoding = """the model's own `generate` (its sampler and temperature schedule, seeded); "full steps" runs
16 denoising steps per canvas with no adaptive stopping, "one step" one step per canvas"""
    card = model_card(
        title,
        about,
        {
            "Data": f"""The generated tasks of `diffexit.dllm.charlm.tasks` ({", ".join(TASK_NAMES)}), training split (a
  CRC32 of the prompt decides the split, so held-out prompts are never trained on). Task shares: {shares}.""",
            "Objective": objective,
            **initialization,
            "Training": f"""{args.steps} steps, AdamW peak lr {args.lr:g} ({args.warmup} warm-up steps, cosine decay to
  a tenth), batches of {args.batch_short} short and {args.batch_long} long examples, seed {args.seed},
  {seconds / 60:.0f} min of training on a 2-core CPU shared with other jobs. `training.json` has the settings,
  `metrics.jsonl` of the run the learning curves.""",
            "Commands": f"`{command}`{commands}" + (" (legs resumed from checkpoints continue bit for bit)"
                                                     if legs else ""),
        },
        [("Held-out accuracy", f"""{n} held-out examples per task, {decoding}. Discriminating tasks are scored for validity (any consistent answer), controls for equality; one-step
decoding solves the controls, so they are left out of the benchmark's headline average.

{accuracy_table(table)}""")],
    )
    write_model_card(directory, card)
