"""What ``diffexit generate text`` runs a batch with: the embedded model's format, a DiffusionGemma model, or a
transformers model.

An engine decodes one batch of items into one record per item (``id``, ``prompt``, ``output``, ``method``, ``nfe``,
``halt_step``, and ``task`` / ``correct`` for prompts of an embedded task); see :mod:`diffexit.app.jobs`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence

from .job_inputs import Item, JobError


def is_embedded_format(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "DiffusionLlama" in (json.loads(config.read_text()).get("architectures") or [])
    except (OSError, ValueError):
        return False


def is_diffusion_gemma(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return data.get("model_type") == "diffusion_gemma" or "DiffusionGemmaForBlockDiffusion" in (
        data.get("architectures") or [])


class GemmaEngine:
    """A ``DiffusionGemmaForBlockDiffusion``, decoded by its own encoder, decoder and sampling in diffexit's loop
    (``diffexit.dllm.gemma_loop.decode``, which equals its ``generate``) with an optional SchED stopping rule.

    The model samples, so each item draws its own noise, each canvas seeded from its id
    (``diffexit.app.job_inputs.item_seed``) and its index: an answer depends on neither its batch nor the process,
    and a stopping rule changes no later canvas's noise. A prompt of an embedded task is left-padded
    to its layout and decodes its span in whole canvases, ``steps`` denoising steps each (default: one per canvas
    token); any other prompt goes through the tokenizer's chat template and decodes ``gen_length`` tokens (default
    128) at ``steps`` per canvas (default: the model's ``max_denoising_steps``).
    """

    def __init__(self, model, tokenizer, method: str, make_rule: Optional[Callable], steps: Optional[int],
                 gen_length: Optional[int]):
        self.model, self.tokenizer, self.method, self.make_rule = model, tokenizer, method, make_rule
        self.steps, self.gen_length = steps, gen_length

    def group(self, item: Item) -> None:
        """Items are decoded one at a time; any can share a batch."""

    def check(self, items: Sequence[Item]) -> None:
        from ..dllm.charlm.tasks import layout_of
        from ..dllm.charlm.tokenizer import encode_prompts

        for item in items:
            try:
                if "task" in item.payload:
                    encode_prompts(self.tokenizer, [item.payload["prompt"]],
                                   layout_of(item.payload["task"]).prompt_length)
                else:
                    self._chat_ids(item.payload["prompt"])
            except ValueError as e:
                raise JobError(f"{item.source}: {e}") from e

    def files(self, item: Item) -> list[str]:
        return []

    def _chat_ids(self, prompt: str):
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template, so only prompts of an embedded task can be decoded")
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]

    def run(self, items: Sequence[Item]) -> list[tuple[dict, dict[str, bytes]]]:
        import torch

        from ..dllm.charlm.gemma import gemma_span
        from ..dllm.charlm.tasks import layout_of, score
        from ..dllm.charlm.tokenizer import decode_answer, encode_prompts
        from ..dllm.gemma_loop import decode
        from .job_inputs import item_seed

        device = next(self.model.parameters()).device
        canvas = self.model.config.canvas_length
        out = []
        for item in items:
            prompt = item.payload["prompt"]
            if "task" in item.payload:
                layout = layout_of(item.payload["task"])
                ids, mask = encode_prompts(self.tokenizer, [prompt], layout.prompt_length)
                new_tokens, steps = gemma_span(layout, canvas), self.steps or canvas
            else:
                ids = self._chat_ids(prompt)
                mask = torch.ones_like(ids)
                new_tokens = self.gen_length or 128
                steps = self.steps or self.model.generation_config.max_denoising_steps or 48
            rule = self.make_rule() if self.make_rule else None
            kwargs = {} if rule is not None else {"confidence_threshold": None}
            result = decode(self.model, ids.to(device), attention_mask=mask.to(device), stopping=rule,
                            seeds=[item_seed(item.id)], max_new_tokens=new_tokens, max_denoising_steps=steps,
                            **kwargs)
            new = result.sequences[0, ids.shape[1]:].cpu()
            text = decode_answer(self.tokenizer, new) if "task" in item.payload else self.tokenizer.decode(
                new, skip_special_tokens=True)
            record = {"id": item.id, "prompt": prompt, "output": text, "method": self.method,
                      "nfe": int(result.passes[0]),
                      "halt_step": None}
            if "task" in item.payload:
                record["task"] = item.payload["task"]
                record["correct"] = score(item.payload["task"], prompt, text)
            out.append((record, {}))
        return out


class EmbeddedEngine:
    """The embedded model's format: each batch shares a task layout; prompts are left-padded to it and decoded with
    its span, steps and blocks (``DECODE``; a block-causal model's own blocks), the spec's options, and the spec's
    block length where it sets one."""

    def __init__(self, model, tokenizer, spec):
        self.model, self.tokenizer, self.spec, self.method = model, tokenizer, spec, spec.rule_name

    def layout(self, item: Item):
        """The item's task's layout; the short one for a prompt without a task."""
        from ..dllm.charlm.tasks import LAYOUTS, layout_of

        return layout_of(item.payload["task"]) if "task" in item.payload else LAYOUTS["short"]

    group = layout  # items of one batch share a layout

    def layout_spec(self, layout):
        """The spec with this layout's lengths filled in."""
        from ..dllm.charlm.tasks import DECODE
        from ..dllm.exact_cache import block_causal_layout

        block_length, steps = DECODE[layout.span_length]
        block_causal = block_causal_layout(self.model)
        if block_causal is not None:
            block_length = block_causal[1]
        try:
            return self.spec.with_lengths(layout.span_length, steps, block_length)
        except ValueError as e:
            raise JobError(f"answers of {layout.span_length} tokens decode in {steps} steps: {e}") from None

    def check(self, items: Sequence[Item]) -> None:
        from ..dllm.charlm.tokenizer import encode_prompts

        from ..dllm.block_decoding import check_block_causal
        from ..dllm.exact_cache import block_causal_layout

        block_causal = block_causal_layout(self.model)
        for layout in {self.layout(item).span_length: self.layout(item) for item in items}.values():
            spec = self.layout_spec(layout)
            if spec.commit is not None:
                # A commit model made for another model or block length is refused before any work.
                try:
                    spec.halting_rule().bind(self.model, spec.block_length)
                except ValueError as e:
                    raise JobError(f"--commit {spec.commit}: {e}") from None
            if block_causal is not None:
                # Said before any work: the loop would refuse it only at its first batch, mid-job.
                try:
                    check_block_causal(block_causal, layout.prompt_length, spec.block_length, spec.cache,
                                       spec.halting_rule())
                except ValueError as e:
                    raise JobError(str(e)) from None
        for item in items:
            try:
                ids, _ = encode_prompts(self.tokenizer, [item.payload["prompt"]], self.layout(item).prompt_length)
            except ValueError as e:
                raise JobError(f"{item.source}: {e}") from e
            if (ids == self.tokenizer.mask_token_id).any():
                raise JobError(f"{item.source}: the prompt contains the mask token; prompts must be fully known")

    def files(self, item: Item) -> list[str]:
        return []

    def run(self, items: Sequence[Item]) -> list[tuple[dict, dict[str, bytes]]]:
        from ..dllm.charlm.tokenizer import decode_answer, encode_prompts
        from ..dllm.generate import generate

        layout = self.layout(items[0])
        prompts = [item.payload["prompt"] for item in items]
        ids, attention = encode_prompts(self.tokenizer, prompts, layout.prompt_length)
        device = next(self.model.parameters()).device
        out = generate(self.model, ids.to(device), attention_mask=attention.to(device),
                       mask_id=self.tokenizer.mask_token_id, eos_token_ids=[self.tokenizer.eos_token_id],
                       **self.layout_spec(layout).loop_kwargs())
        texts = [decode_answer(self.tokenizer, span) for span in out.generated.cpu()]
        return _records(items, texts, out, self.method)


class TransformersEngine:
    """A model loaded through transformers, decoded by :class:`~diffexit.dllm.pipeline.MaskedDiffusionPipeline`."""

    def __init__(self, pipe, spec):
        self.pipe, self.spec, self.method = pipe, spec, spec.rule_name

    def group(self, item: Item) -> None:
        """Any prompts can share a batch: the pipeline pads them to the longest."""

    def check(self, items: Sequence[Item]) -> None:
        """Prompts are tokenized per batch by the pipeline; nothing to check ahead."""

    def files(self, item: Item) -> list[str]:
        return []

    def run(self, items: Sequence[Item]) -> list[tuple[dict, dict[str, bytes]]]:
        out = self.pipe([item.payload["prompt"] for item in items], self.spec)
        return _records(items, out.texts, out.generation, self.method)


def _records(items: Sequence[Item], texts: Sequence[str], generation, method: str) -> list[tuple[dict, dict]]:
    from ..dllm.charlm.tasks import score

    out = []
    for item, text, nfe, halt in zip(items, texts, generation.nfe.tolist(), generation.halt_step.tolist()):
        record = {"id": item.id, "prompt": item.payload["prompt"], "output": text, "method": method, "nfe": nfe,
                  "halt_step": halt if halt >= 0 else None}
        if "task" in item.payload:
            record["task"] = item.payload["task"]
            record["correct"] = score(item.payload["task"], item.payload["prompt"], text)
        out.append((record, {}))
    return out
