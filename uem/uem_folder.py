"""A UEM folder on disk: where its heads sit, and the fine-tuned backbone it may bring.

``diffexit train uem --out RUN`` writes ``RUN/uem`` (the heads: ``config.json`` and the safetensors weights, with
the ``diffexit calibrate uem`` files beside them) and, after a full fine-tune, ``RUN/transformer``, the backbone
the heads were trained with. A bare ``UEMStack.save_pretrained`` folder works too, and one whose parent holds a
``transformer/`` was trained on that backbone: that is how heads of several targets share one fine-tuned backbone
(``uem/digits/weights/uem-digits-exits/<target>``).

Every problem is a one-line ``ValueError`` that names the folder, what is missing or unreadable, and the command
that writes it; :func:`heads_dir` finds those of the layout without reading any weights, so a command can check a
folder before its expensive work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from torch import nn

from .block_adapters import supported_class
from .heads import UEMStack

WRITER = "`diffexit train uem --out RUN` writes RUN/uem"


def load_pretrained(cls, folder: Path, what: str, fix: str):
    """``cls.from_pretrained(folder)`` in float32 and eval mode, from local files only.

    Raises ``ValueError`` in one line: ``what`` cannot be loaded, the file that is missing or unreadable, and
    ``fix``. (diffusers' own error for a truncated file names the file twice and chains two more tracebacks.)
    """
    weights = folder / SAFETENSORS_WEIGHTS_NAME
    if not (folder / "config.json").is_file():
        raise ValueError(f"cannot load the {what}: {folder} has no config.json; {fix}")
    try:
        return cls.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True).eval()
    except OSError:
        problem = f"{weights} is unreadable (truncated, or not a safetensors file)" if weights.is_file() else \
            f"{folder} has no readable weights ({SAFETENSORS_WEIGHTS_NAME})"
        raise ValueError(f"cannot load the {what}: {problem}; {fix}") from None
    except Exception as e:  # a malformed config: say which folder, and why
        raise ValueError(f"cannot load the {what} from {folder}: {e}; {fix}") from None


def heads_dir(directory) -> Path:
    """Where the heads of a UEM folder sit (``DIR/uem`` in a run folder, else ``DIR``), checked to hold both of the
    files ``from_pretrained`` reads; reads no weights."""
    directory = Path(directory)
    if not directory.is_dir():
        state = "is a file, not a folder" if directory.exists() else "does not exist"
        raise ValueError(f"UEM folder {directory} {state}; pass the folder that {WRITER}")
    heads = directory / "uem" if (directory / "uem" / "config.json").is_file() else directory
    missing = [name for name in ("config.json", SAFETENSORS_WEIGHTS_NAME) if not (heads / name).is_file()]
    if missing:
        where = f"{directory} (nor {directory / 'uem'})" if heads == directory else str(heads)
        raise ValueError(f"cannot load the UEMs: {where} has no {' and no '.join(missing)}; pass the folder that "
                         f"{WRITER} (config.json and {SAFETENSORS_WEIGHTS_NAME})")
    return heads


def backbone_dir(heads: Path) -> Optional[Path]:
    """The fine-tuned backbone beside the heads in ``heads`` (a :func:`heads_dir`), or None."""
    backbone = Path(heads).parent / "transformer"
    return backbone if (backbone / "config.json").is_file() else None


@dataclass(frozen=True)
class UEMFolder:
    """What a UEM folder holds, loaded.

    Attributes:
        uem: the heads, float32, eval mode.
        backbone: the fine-tuned transformer they were trained with (float32, eval mode), or None: the heads belong
            to the model they were trained on unchanged.
        heads: the folder of the heads, where their calibration files sit.
    """

    uem: UEMStack
    backbone: Optional[nn.Module]
    heads: Path


def load_uem_folder(directory) -> UEMFolder:
    """The heads in ``directory`` (a run folder or a bare ``UEMStack`` folder) and the backbone they bring."""
    heads = heads_dir(directory)
    uem = load_pretrained(UEMStack, heads, "UEMs", f"train them again: {WRITER}")
    backbone = backbone_dir(heads)
    if backbone is None:
        return UEMFolder(uem, None, heads)
    cls = supported_class(uem.config.model_class)
    tuned = load_pretrained(cls, backbone, f"fine-tuned {cls.__name__} beside the UEMs",
                            "`diffexit train uem --mode full --out RUN` writes RUN/transformer with RUN/uem")
    return UEMFolder(uem, tuned, heads)
