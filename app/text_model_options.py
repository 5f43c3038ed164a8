"""Which text model to load and how, typed: the one door ``generate text`` and ``diffexit eval`` both go through.

    options = TextModelOptions(model="charlm-block")
    loaded = load_text_model(options, device)          # kind, model (or pipeline), tokenizer
    engine, full_engine, decode = build_engines(loaded, "full", {}, DecodeSpec())   # diffexit.app.generate_text

The decoding options (lengths, block length, cache, parallel commits, the halting or commit rule) are a
:class:`~diffexit.dllm.decode_spec.DecodeSpec`; what is here only says which weights load and how the transformers
path wraps them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from .job_inputs import JobError
from .text_engines import is_diffusion_gemma, is_embedded_format

DTYPES = ("float32", "bfloat16", "float16")
# Settings of models loaded through transformers, by their flag names; the embedded format and DiffusionGemma
# decode by their own layouts instead.
TRANSFORMERS_ONLY = ("loop", "mask_id", "trust_remote_code")
TRANSFORMERS_DEFAULTS = {"loop": "llada", "mask_id": None, "trust_remote_code": False}


@dataclass(frozen=True)
class TextModelOptions:
    """Which model, and how to load it.

    Attributes:
        model: ``charlm``, ``charlm-block`` or ``gemma`` (the embedded models), a model folder, or a Hub id in the
            local Hugging Face cache; None: ``charlm``.
        dtype: the weights' dtype, one of :data:`DTYPES`.
        loop: transformers models: ``llada`` or ``dream``; None: ``llada``.
        mask_id: transformers models: the mask token id, for tokenizers that declare none (LLaDA: 126336).
        trust_remote_code: transformers models: run the checkpoint's own code (LLaDA, Dream); None: False.
    """

    model: Optional[str] = None
    dtype: str = "float32"
    loop: Optional[str] = None
    mask_id: Optional[int] = None
    trust_remote_code: Optional[bool] = None

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise JobError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.loop not in (None, "llada", "dream"):
            raise JobError(f"loop must be llada or dream, got {self.loop!r}")

    def given_transformers_only(self) -> list[str]:
        """The transformers-only settings that were given, by name."""
        return [k for k in TRANSFORMERS_ONLY if getattr(self, k) is not None]

    def transformers_setting(self, name: str) -> Any:
        """A transformers-only setting, its default filled in."""
        value = getattr(self, name)
        return TRANSFORMERS_DEFAULTS[name] if value is None else value


@dataclass(frozen=True)
class LoadedTextModel:
    """A loaded model: ``kind`` is ``"embedded"``, ``"gemma"`` or ``"transformers"`` (then ``model`` is a
    ``MaskedDiffusionPipeline``); ``options.model`` is the folder it was loaded from (None: the embedded
    default)."""

    options: TextModelOptions
    kind: str
    model: Any
    tokenizer: Any


def load_text_model(options: TextModelOptions, device) -> LoadedTextModel:
    """Load ``options.model`` onto ``device`` (a Hub id from its snapshot in the local cache; nothing is
    downloaded). A model that cannot load raises :class:`~diffexit.app.job_inputs.JobError` naming it, where, and
    why, once."""
    import torch

    from .models import (
        LoadError,
        load_gemma_or_embedded,
        load_masked_diffusion_pipeline,
        load_text_model_or_embedded,
        resolve_text_model,
    )

    dtype = getattr(torch, options.dtype)
    try:
        folder = None if options.model is None else str(resolve_text_model(options.model, hub=True))
        options = replace(options, model=folder)
        if folder is None or is_embedded_format(Path(folder)):
            model, tokenizer = load_text_model_or_embedded(folder and Path(folder), dtype=dtype)
            return LoadedTextModel(options, "embedded", model.to(device), tokenizer)
        if is_diffusion_gemma(Path(folder)):
            model, tokenizer = load_gemma_or_embedded(Path(folder), dtype=dtype)
            return LoadedTextModel(options, "gemma", model.to(device), tokenizer)
        pipe = load_masked_diffusion_pipeline(folder, dtype=dtype, device=device,
                                              loop=options.transformers_setting("loop"),
                                              mask_id=options.mask_id,
                                              trust_remote_code=options.transformers_setting("trust_remote_code"))
        return LoadedTextModel(options, "transformers", pipe, pipe.tokenizer)
    except LoadError as e:
        raise JobError(str(e)) from None
