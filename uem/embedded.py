"""The shipped image models: where their files live in the package, and how to load them offline.

- ``uem/weights/dit-digits``: the class-conditional digits DiT as a ``DigitsDiTPipeline`` directory
  (``save_pretrained``: transformer in fp16 safetensors, DDIM scheduler config, MODEL_CARD.md).
- ``uem/weights/classifier``: the digits CNN that measures generated digits (safetensors, MODEL_CARD.md).
- ``uem/weights/uem-digits/<target>``: DeeDiff uncertainty heads for the DiT, one folder per training target
  (``UEMStack.save_pretrained`` plus ``training.json``), with ``diffexit calibrate uem`` files beside them.

All are package data, so loading needs no network and no Hugging Face cache.
"""

from __future__ import annotations

from pathlib import Path

import torch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DIT_DIR = WEIGHTS_DIR / "dit-digits"
CLASSIFIER_DIR = WEIGHTS_DIR / "classifier"
# UEM heads for the embedded DiT, one folder per training target; the demo and `generate images` default to the
# target that wins `diffexit bench images` at matched layer ratio.
UEM_DIR = WEIGHTS_DIR / "uem-digits"
DEFAULT_UEM_TARGET = "exit-cost"
UEM_COMMAND = "diffexit train uem --out RUN --steps 250 --batch-size 32"
# How the shipped files were made (MODEL_CARD.md has the details): a 1500-step run, extended to 3000 then 4500 steps.
DIT_COMMAND = ("diffexit train image && diffexit train image --resume --steps 3000 && "
               "diffexit train image --resume --steps 4500 --export uem/weights/dit-digits")


def load_embedded_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The shipped ``DigitsDiTPipeline`` on ``device``, computing in ``dtype`` (weights are stored in fp16).

    The transformer's built-in per-block label dropout is off (see ``train_backbone.disable_label_dropout``),
    so training on top of it in train mode sees the labels it is given.

    Raises FileNotFoundError, naming the command that makes the files, when they are missing.
    """
    from .pipeline import DigitsDiTPipeline
    from .train_backbone import disable_label_dropout

    if not (DIT_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the embedded digits DiT is missing from {DIT_DIR}; train and export it with `{DIT_COMMAND}` "
            "(run from the repository root)"
        )
    pipe = DigitsDiTPipeline.from_pretrained(str(DIT_DIR), dtype=dtype, local_files_only=True)
    disable_label_dropout(pipe.transformer)
    return pipe.to(device)


def embedded_uem_dir(target: str = DEFAULT_UEM_TARGET) -> Path:
    """The shipped UEM heads trained on ``target`` for the embedded DiT (a ``UEMStack`` folder, with the
    ``diffexit calibrate uem`` files beside them).

    Raises FileNotFoundError, naming the command that makes them, when they are missing.
    """
    path = UEM_DIR / target
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no UEM heads for the {target!r} target in {path}; train them with `{UEM_COMMAND} "
                                f"--target {target}` and copy RUN/uem there")
    return path


def load_embedded_classifier(device: str | torch.device = "cpu"):
    """The shipped ``DigitsClassifier`` in eval mode on ``device``, gradients off.

    Raises FileNotFoundError, naming the command that makes the file, when it is missing.
    """
    from .classifier import load_classifier

    return load_classifier(CLASSIFIER_DIR, device)
