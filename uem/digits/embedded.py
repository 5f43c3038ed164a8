"""Loading the shipped image models offline (their files: :mod:`.files`)."""

from __future__ import annotations

from pathlib import Path

import torch

from .classifier import DigitsClassifier, load_classifier
from .files import (
    CLASSIFIER_DIR,
    DEFAULT_UEM_TARGET,
    DIT_COMMAND,
    DIT_DIR,
    EXITS_COMMAND,
    EXITS_DIR,
    UEM_COMMAND,
    UEM_DIR,
)
from .model import disable_label_dropout
from .pipeline import DigitsDiTPipeline


def load_embedded_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
                           exit_trained: bool = False) -> DigitsDiTPipeline:
    """The shipped ``DigitsDiTPipeline`` on ``device``, computing in ``dtype`` (weights are stored in fp16);
    ``exit_trained``: with the backbone fine-tuned with DeeDiff's loss (``weights/uem-digits-exits``) instead.

    The transformer's built-in per-block label dropout is off (see :func:`.model.disable_label_dropout`), so
    training on top of it in train mode sees the labels it is given.

    Raises FileNotFoundError, naming the command that makes the files, when they are missing.
    """
    if not (DIT_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the embedded digits DiT is missing from {DIT_DIR}; train and export it with `{DIT_COMMAND}` "
            "(run from the repository root)"
        )
    pipe = DigitsDiTPipeline.from_pretrained(str(DIT_DIR), dtype=dtype, local_files_only=True)
    if exit_trained:
        from diffusers import DiTTransformer2DModel

        if not (EXITS_DIR / "transformer" / "config.json").is_file():
            raise FileNotFoundError(f"the exit-trained digits DiT is missing from {EXITS_DIR}; make it with "
                                    f"`{EXITS_COMMAND}`")
        tuned = DiTTransformer2DModel.from_pretrained(str(EXITS_DIR / "transformer"), dtype=dtype,
                                                      local_files_only=True)
        pipe = DigitsDiTPipeline(transformer=tuned, scheduler=pipe.scheduler)
    disable_label_dropout(pipe.transformer)
    return pipe.to(device)


def embedded_uem_dir(target: str = DEFAULT_UEM_TARGET, *, exit_trained: bool = False) -> Path:
    """The shipped UEM heads trained on ``target`` for the embedded DiT (a ``UEMStack`` folder, with the
    ``diffexit calibrate uem`` files beside them); ``exit_trained``: those of the exit-trained backbone.

    Raises FileNotFoundError, naming the command that makes them, when they are missing.
    """
    path = (EXITS_DIR if exit_trained else UEM_DIR) / target
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no UEM heads for the {target!r} target in {path}; train them with `{UEM_COMMAND} "
                                f"--target {target}` and copy RUN/uem there")
    return path


def load_embedded_classifier(device: str | torch.device = "cpu") -> DigitsClassifier:
    """The shipped ``DigitsClassifier`` in eval mode on ``device``, gradients off.

    Raises FileNotFoundError, naming the command that makes the file, when it is missing.
    """
    return load_classifier(CLASSIFIER_DIR, device)
