"""A diffusers pipeline for full-span masked-diffusion LMs (LLaDA, Dream, the embedded model), with halting.

    pipe = MaskedDiffusionPipeline.from_transformers("GSAI-ML/LLaDA-8B-Instruct", trust_remote_code=True,
                                                     mask_id=126336, halting=SchED())
    out = pipe(["What is 2+2?"], gen_length=128, steps=128, block_length=32)
    out.texts, out.nfe

Text in, text out: prompts are tokenized as given (left-padded; apply an instruct model's chat template to
them first), decoded by :func:`~diffexit.dllm.generate` (LLaDA style) or
:func:`~diffexit.dllm.dream_generate` (Dream style), and cut at the first EOS.

The embedded model is built by hand, with the prompt layout it was trained on (prompts left-padded to 24)::

    model, tok = load_embedded_text_model()              # diffexit.dllm.charlm.model
    pipe = MaskedDiffusionPipeline(model, tok, prompt_length=24, halting=SchED(stat="min"))
    pipe.save_pretrained("my-pipe")                      # model, tokenizer, loop, mask id, layout, halting rule
    MaskedDiffusionPipeline.from_pretrained("my-pipe")

``from_transformers`` refuses a checkpoint whose weights the transformers class it resolves to would drop (the
embedded model's learned positions, say), naming the weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Union

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from .decode_spec import LOOPS, DecodeSpec
from .dream import dream_generate
from .generate import generate
from .halting import HaltingRule
from .output import GenerationOutput
from .rule_spec import halting_from_spec, halting_spec


@dataclass
class MaskedDiffusionPipelineOutput(BaseOutput):
    """``texts``: one decoded answer per prompt; ``generation``: the loop's full :class:`GenerationOutput`."""

    texts: list[str]
    generation: GenerationOutput


class MaskedDiffusionPipeline(DiffusionPipeline):
    """Holds a masked-diffusion LM, its tokenizer and a default halting rule.

    Args:
        model: maps ``input_ids`` (and ``attention_mask``) to ``.logits``.
        tokenizer: a transformers tokenizer; its ``mask_token_id`` is used unless ``mask_id`` is given.
        halting: the default halting rule for calls that don't pass one (None: fixed steps).
        loop: ``llada`` (bidirectional, blocks) or ``dream`` (shifted logits, one span).
        mask_id: the mask token id, for tokenizers that don't declare one (LLaDA: 126336).
        prompt_length: pad every prompt on the left to this many tokens; None: the model's own ``prompt_length``
            when it declares one (the embedded model: 24), else the longest prompt of each call.
    """

    def __init__(self, model, tokenizer, halting: Union[HaltingRule, dict, None] = None, loop: str = "llada",
                 mask_id: Optional[int] = None, prompt_length: Optional[int] = None):
        super().__init__()
        if loop not in LOOPS:
            raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
        if prompt_length is not None and (isinstance(prompt_length, bool) or not isinstance(prompt_length, int)
                                          or prompt_length < 1):
            raise ValueError(f"prompt_length must be a positive int (or None: pad to the longest), got "
                             f"{prompt_length!r}")
        self.register_modules(model=model, tokenizer=tokenizer)
        # A model trained on a fixed prompt layout says so (DiffusionLlama: 24); padding to the longest prompt
        # would move its answer span and give garbage.
        prompt_length = getattr(model, "prompt_length", None) if prompt_length is None else prompt_length
        mask_id = mask_id if mask_id is not None else getattr(tokenizer, "mask_token_id", None)
        if mask_id is None:
            raise ValueError("the tokenizer declares no mask_token_id; pass mask_id= (LLaDA uses 126336)")
        # A saved pipeline loads its halting rule back from this dict form.
        halting = halting_from_spec(halting) if isinstance(halting, dict) else halting
        # In the config, so that save_pretrained / from_pretrained keep them.
        self.register_to_config(loop=loop, mask_id=mask_id, prompt_length=prompt_length,
                                halting=None if halting is None else halting_spec(halting))
        self.halting, self.loop, self.mask_id, self.prompt_length = halting, loop, mask_id, prompt_length

    @classmethod
    def from_transformers(cls, model_id_or_path: str, *, trust_remote_code: bool = False, loop: str = "llada",
                          halting: Optional[HaltingRule] = None, mask_id: Optional[int] = None,
                          torch_dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu",
                          prompt_length: Optional[int] = None):
        """Load a model and tokenizer with transformers (``trust_remote_code=True`` for LLaDA / Dream)."""
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_id_or_path, trust_remote_code=trust_remote_code)
        kw = dict(trust_remote_code=trust_remote_code, dtype=torch_dtype, output_loading_info=True)
        try:
            model, info = AutoModelForCausalLM.from_pretrained(model_id_or_path, **kw)
        except ValueError:
            # LLaDA and Dream register their classes under AutoModel only.
            model, info = AutoModel.from_pretrained(model_id_or_path, **kw)
        unused = sorted(info.get("unexpected_keys") or [])
        if unused:
            declared = getattr(model.config, "architectures", None) or ["?"]
            raise ValueError(
                f"{model_id_or_path} declares a {declared[0]}, but transformers loaded it as a "
                f"{type(model).__name__}, which drops its weights {unused[:4]}; load the model with its own class "
                f"and build the pipeline from it: MaskedDiffusionPipeline(model, tokenizer) (for the embedded "
                f"model: diffexit.dllm.charlm.model.load_text_model(path), and prompt_length=24)")
        return cls(model.to(device).eval(), tokenizer, halting=halting, loop=loop, mask_id=mask_id,
                   prompt_length=prompt_length)

    @torch.no_grad()
    def __call__(self, prompt: Union[str, list[str]], spec: Optional[DecodeSpec] = None, *,
                 gen_length: Optional[int] = None, steps: Optional[int] = None, block_length: Optional[int] = None,
                 remasking: Optional[str] = None, cache: Optional[str] = None,
                 parallel_threshold: Optional[float] = None, halting: Optional[HaltingRule] = None,
                 alg: Optional[str] = None, temperature: float = 0.0, generator: Optional[torch.Generator] = None,
                 return_trace: bool = False) -> MaskedDiffusionPipelineOutput:
        """Generate one answer per prompt.

        The decoding options come from ``spec`` (a :class:`~diffexit.dllm.decode_spec.DecodeSpec`; its ``loop``
        must be this pipeline's) and the keyword arguments, which override it; ``gen_length`` and ``steps`` must
        be set by one of them. ``halting`` is a rule object, for rules that have no spec form; without it the
        spec's method, then the pipeline's default rule, decide. ``alg`` is the dream loop's ordering
        (:data:`~diffexit.dllm.dream.ALGS`).
        """
        spec = spec or DecodeSpec(loop=self.loop)
        if spec.loop != self.loop:
            raise ValueError(f"the spec decodes with the {spec.loop} loop, and this pipeline runs the {self.loop} "
                             f"loop; build the spec with loop={self.loop!r}")
        changes = {k: v for k, v in dict(gen_length=gen_length, steps=steps, block_length=block_length,
                                          remasking=remasking, cache=cache,
                                          parallel_threshold=parallel_threshold).items() if v is not None}
        spec = spec.replace(**changes) if changes else spec
        if alg is not None and self.loop != "dream":
            raise ValueError("alg orders the dream loop's commits; the llada loop takes remasking=")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or any(not isinstance(p, str) or not p for p in prompts):
            raise ValueError("prompt must be a non-empty string or a list of non-empty strings")
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"
        padding = {"padding": True} if self.prompt_length is None else {"padding": "max_length",
                                                                        "max_length": self.prompt_length}
        try:
            enc = self.tokenizer(prompts, return_tensors="pt", add_special_tokens=False, **padding)
        finally:
            self.tokenizer.padding_side = side
        if enc["input_ids"].shape[1] > (self.prompt_length or enc["input_ids"].shape[1]):
            longest = max(len(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
            raise ValueError(f"a prompt is {longest} tokens, longer than this pipeline's prompt_length="
                             f"{self.prompt_length}; shorten it (the model was trained on that layout)")
        device = next(self.model.parameters()).device
        input_ids, attention_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        if attention_mask.all():
            attention_mask = None
        kwargs = spec.loop_kwargs()
        # A rule keeps per-run state; a private copy keeps concurrent calls (the demo) apart.
        if halting is not None or spec.method == "full":
            kwargs["halting"] = copy.deepcopy(halting if halting is not None else self.halting)
        kwargs.update(mask_id=self.mask_id, attention_mask=attention_mask, temperature=temperature,
                      generator=generator, return_trace=return_trace)
        if self.loop == "llada":
            out = generate(self.model, input_ids, **kwargs)
        else:
            out = dream_generate(self.model, input_ids, **kwargs, **({} if alg is None else {"alg": alg}))
        return MaskedDiffusionPipelineOutput(texts=self.decode(out.generated), generation=out)

    def decode(self, generated: torch.Tensor) -> list[str]:
        """Decode ``[B, L]`` span tokens, cut at the first EOS, without special tokens."""
        eos = self.tokenizer.eos_token_id
        texts = []
        for row in generated.tolist():
            if eos is not None and eos in row:
                row = row[:row.index(eos)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return texts
