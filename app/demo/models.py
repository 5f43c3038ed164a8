"""The demo's models: each loaded on first use through the shared loaders (:mod:`diffexit.app.models`), then shared
by every request."""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path
from typing import Optional, Union

from .forms import _error

# The package's own folder, as the page names it: messages about shipped files say ``diffexit/...``, not where
# the package happens to be installed.
PACKAGE_DIR = Path(__file__).resolve().parents[2]


def shown_path(path: Union[str, Path]) -> str:
    """``path`` as the page shows it, so whoever opens the page does not learn where the user's files live (their
    home folder, their user name): relative to the working directory, or a shipped file outside it as
    ``diffexit/...`` (on another drive, Windows, the name alone)."""
    path = Path(path).resolve()
    for root, shown in ((Path.cwd(), Path()), (PACKAGE_DIR, Path("diffexit"))):
        if path.is_relative_to(root):
            return str(shown / path.relative_to(root))
    try:
        return os.path.relpath(path)
    except ValueError:
        return path.name


def release_freed_memory() -> None:
    """Free what earlier requests left as garbage and hand it back to the OS (glibc's ``malloc_trim``).

    Nothing a request makes outlives it, but its matplotlib figure is a reference cycle holding its renderer's
    pixel buffer, freed only by a full garbage collection, which Python runs rarely with a million long-lived
    objects about (the libraries, the models); and glibc keeps freed buffers for reuse instead of returning them.
    So the server's RSS grew with every request: 1078 -> 1159 MB over 100 small ones. Collecting at the start of
    every request keeps it flat (1066 -> 1070 MB over 100); the models' loaders ``gc.freeze()`` what exists once a
    model is loaded, so the collection scans only what requests made since (an object of a request in flight
    then is never collected: at most one request's worth, once per model).
    """
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _malloc_trim():
    import ctypes

    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
    except OSError:
        return None


_MALLOC_TRIM = _malloc_trim()


class Models:
    """Where the demo's models come from; each is loaded on first use and then shared by every request.

    Args:
        text_model: an exported text model directory (``diffexit train text --export``), an embedded model's name
            (``charlm``, ``charlm-block``, ``gemma``: :func:`diffexit.app.models.embedded_text_models`); None: the
            embedded ``charlm``.
        image_pipeline: a ``DigitsDiTPipeline`` or ``DiTPipeline`` directory; None: the embedded digits DiT.
        uem: a UEM folder (``UEMStack`` weights, or a ``diffexit train uem --out RUN`` folder) for that pipeline's
            transformer; None: the shipped heads for the embedded DiT, and none for a pipeline of your own (the
            DeeDiff rules are then unavailable).
    """

    def __init__(self, text_model: Union[str, Path, None] = None, image_pipeline: Optional[Path] = None,
                 uem: Optional[Path] = None):
        from ..models import embedded_text_models

        embedded = embedded_text_models()
        # An embedded model named on the command line is shown by that name.
        self.text_name = text_model if isinstance(text_model, str) and text_model in embedded else None
        if self.text_name is not None:
            text_model = embedded[self.text_name]
        if uem is None and image_pipeline is None:
            from ...uem.digits.embedded import embedded_uem_dir

            try:
                uem = embedded_uem_dir()
            except FileNotFoundError:
                pass
        path = lambda p: None if p is None else Path(p)
        self.text_path, self.image_path, self.uem_path = path(text_model), path(image_pipeline), path(uem)
        self._text = self._pipe = self._uem = None
        self._text_lock, self._image_load_lock = threading.Lock(), threading.Lock()
        # Held for a whole DiffusionGemma decode: its generate reads the SchED rule from the shared model instance.
        self.gemma_lock = threading.Lock()
        # Held for a whole image run: the early-exit hook and the scheduler swap live on the shared pipeline.
        self.image_run_lock = threading.Lock()

    def hide_paths(self, message: str) -> str:
        """``message`` with the absolute paths of this demo's folders and of the package written as the page shows
        them (:func:`shown_path`): a loader's message names the folder it failed on."""
        folders = {PACKAGE_DIR: shown_path(PACKAGE_DIR)}
        for folder in (self.text_path, self.image_path, self.uem_path):
            if folder is not None and folder.is_absolute():
                folders.update({folder: shown_path(folder), folder.resolve(): shown_path(folder)})
        for folder in sorted(folders, key=lambda f: -len(str(f))):  # the longest first: a folder inside another
            message = message.replace(str(folder), folders[folder])
        return message

    def error(self, message: str):
        """``gr.Error`` with :meth:`hide_paths` applied."""
        return _error(self.hide_paths(message))

    def describe(self) -> str:
        """One markdown line per model, from the paths alone (nothing is loaded); no absolute paths."""
        if self.text_name is not None:
            text = f"embedded `{self.text_name}`"
        else:
            text = f"`{shown_path(self.text_path)}`" if self.text_path else "embedded `charlm`"
        image = f"`{shown_path(self.image_path)}`" if self.image_path else "the embedded digits DiT"
        uem = (f"`{shown_path(self.uem_path)}`" if self.uem_path else
               "none loaded, so the DeeDiff rules are unavailable (start with `--uem DIR`)")
        return f"**Text model:** {text}  \n**Image pipeline:** {image}  \n**UEMs:** {uem}"

    def text_is_gemma(self) -> bool:
        """Whether the text model is a ``DiffusionGemmaForBlockDiffusion``, from its config alone (nothing is
        loaded): the text tab then decodes with the model's own ``generate``."""
        from ..text_engines import is_diffusion_gemma

        return self.text_path is not None and is_diffusion_gemma(Path(self.text_path))

    def block_causal_layout(self) -> Optional[tuple[int, int]]:
        """``(prompt_length, block_length)`` of a block-causal text model, from its config alone (nothing is
        loaded); None for any other (:func:`diffexit.dllm.exact_cache.block_causal_layout`)."""
        import json
        from types import SimpleNamespace

        from ...dllm.exact_cache import block_causal_layout

        try:
            config = json.loads((self.text_path / "config.json").read_text()) if self.text_path else {}
        except (OSError, ValueError):
            return None  # loading the model says what is wrong with it
        return block_causal_layout(SimpleNamespace(config=SimpleNamespace(**config)))

    def gemma_canvas_length(self) -> int:
        """The DiffusionGemma text model's canvas length, from its config alone."""
        import json

        try:
            return int(json.loads((Path(self.text_path) / "config.json").read_text())["canvas_length"])
        except (OSError, ValueError, KeyError) as e:
            raise self.error(f"cannot read the canvas length of the DiffusionGemma in {self.text_path}: {e}") from e

    def text(self):
        """``(model, tokenizer)``, loaded once."""
        from ..models import load_gemma_or_embedded, load_text_model_or_embedded

        with self._text_lock:
            if self._text is None:
                gemma = self.text_is_gemma()
                try:
                    model, tok = (load_gemma_or_embedded if gemma else load_text_model_or_embedded)(self.text_path)
                except (OSError, ValueError) as e:
                    raise self.error(str(e)) from e
                (_warm_up_gemma if gemma else _warm_up_text)(model, tok)
                self._text = model, tok
                gc.freeze()
            return self._text

    def pipeline(self):
        """The image pipeline on CPU in float32, loaded once."""
        from ..models import LoadError, load_dit_pipeline, load_uem, with_backbone

        with self._image_load_lock:
            if self._pipe is None:
                try:
                    pipe = load_dit_pipeline(self.image_path)
                    if self.uem_path is not None:
                        # UEMs trained with a fine-tuned backbone (train uem --mode full) run on it.
                        pipe = with_backbone(pipe, load_uem(self.uem_path)[1])
                except LoadError as e:  # one line naming what failed to load, where, and the fix
                    raise self.error(str(e)) from e
                # The first call pays one-off costs (allocations, first dispatch); paying them now keeps them out
                # of the timed comparison.
                pipe([0], guidance_scale=1.0, num_inference_steps=1, output_type="pt")
                self._pipe = pipe
                gc.freeze()
            return self._pipe

    def num_classes(self) -> int:
        """How many classes the image pipeline draws, from its files alone (nothing is loaded)."""
        import json

        if self.image_path is None:
            from ...uem.digits.data import NUM_CLASSES

            return NUM_CLASSES
        try:
            index = json.loads((Path(self.image_path) / "model_index.json").read_text())
            if index.get("_class_name") == "DigitsDiTPipeline":
                from ...uem.digits.data import NUM_CLASSES

                return NUM_CLASSES
            config = json.loads((Path(self.image_path) / "transformer" / "config.json").read_text())
            return int(config["num_embeds_ada_norm"])
        except (OSError, ValueError, KeyError) as e:
            raise self.error(f"cannot read the classes of the image pipeline in {self.image_path}: {e}") from e

    def default_guidance(self) -> float:
        """The image pipeline's own default guidance scale, from its class (nothing is loaded)."""
        import inspect
        import json

        from ...uem.digits.pipeline import GUIDANCE_SCALE

        if self.image_path is None:
            return GUIDANCE_SCALE
        try:
            name = json.loads((Path(self.image_path) / "model_index.json").read_text()).get("_class_name")
        except (OSError, ValueError):
            return GUIDANCE_SCALE
        if name != "DiTPipeline":
            return GUIDANCE_SCALE
        from diffusers import DiTPipeline

        return float(inspect.signature(DiTPipeline.__call__).parameters["guidance_scale"].default)

    def heads_dir(self) -> Optional[Path]:
        """The folder the UEM heads (and their calibration files) sit in, or None without UEMs."""
        from ..models import uem_heads_dir

        return None if self.uem_path is None else uem_heads_dir(self.uem_path)

    def calibrations(self) -> dict[str, Path]:
        """The ``diffexit calibrate uem`` files beside the UEMs, by budget label (``"0.02"``); nothing is loaded."""
        from ...uem.calibration_file import calibration_label, calibrations_in

        if self.uem_path is None:
            return {}
        return {calibration_label(p): p for p in calibrations_in(self.heads_dir())}

    def uem(self):
        """The ``UEMStack`` for the pipeline's transformer, loaded once; gr.Error when there is none."""
        from ..models import load_uem

        if self.uem_path is None:
            source = "the embedded digits DiT ships without them" if self.image_path is None else \
                f"none were given for {shown_path(self.image_path)}"
            raise _error(
                f"The DeeDiff rules read uncertainty heads (UEMs), and {source}. Start the demo with --uem DIR "
                f"(the uem/ folder that `diffexit train uem --out RUN` writes), or pick the rule 'off' or "
                f"'static depth'."
            )
        with self._image_load_lock:
            if self._uem is None:
                try:
                    self._uem = load_uem(self.uem_path)[0]
                    gc.freeze()
                except ValueError as e:
                    raise self.error(str(e)) from e
            return self._uem


def _warm_up_text(model, tokenizer) -> None:
    """One short decode, so the first request's timings do not include one-off costs; a block-causal model's in
    its own layout (a prompt block, then one span block)."""
    from ...dllm.charlm.tokenizer import encode_prompts
    from ...dllm.exact_cache import block_causal_layout
    from ...dllm.generate import generate

    prompt_length, block = block_causal_layout(model) or (1, 2)
    ids, attn = encode_prompts(tokenizer, ["a"], prompt_length)
    generate(model, ids, attention_mask=attn, gen_length=block, steps=1, mask_id=tokenizer.mask_token_id)


def _warm_up_gemma(model, tokenizer) -> None:
    """One denoising step of one canvas, so the first request's timings do not include one-off costs."""
    import torch

    ids = torch.tensor([[tokenizer.eos_token_id]])
    model.generate(ids, max_new_tokens=1, max_denoising_steps=1, confidence_threshold=None)
