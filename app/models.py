"""One loader per kind of model, shared by every command, the demo, the benches and batch generation.

Each takes a folder (or None for the embedded model) and raises :class:`LoadError` with one line that names the
folder, what is wrong with it and what to pass instead; each surface turns that into its own kind of error. A
message about a folder that exists but does not load starts with ``cannot load``.

- :func:`load_dit_pipeline`: a DiT pipeline to sample with (``DigitsDiTPipeline``, ``DiTPipeline``, or a bare
  ``DiTTransformer2DModel`` folder such as a full fine-tune's ``transformer/``, sampled with the embedded
  pipeline's scheduler).
- :func:`load_dit_backbone`: the same folders, as what training needs: transformer, VAE, noise schedule.
- :func:`load_uem`: UEM heads, from ``UEMStack.save_pretrained`` or a ``diffexit train uem --out`` run folder
  (which may bring its fine-tuned backbone); ``attach_early_exits`` reads the same folders itself.
- :func:`load_text_model_or_embedded`: the embedded text model's format; :func:`load_gemma_or_embedded`: a
  DiffusionGemma; :func:`load_masked_diffusion_pipeline`: any other masked-diffusion LM, through transformers.
  :func:`resolve_text_model` turns a ``--model`` value (an embedded name, a folder, a Hub id already in the local
  Hugging Face cache) into a folder; nothing is downloaded.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Optional

import torch

PIPELINES = ("DigitsDiTPipeline", "DiTPipeline")
# The files AutoTokenizer builds a tokenizer from. Without any of them transformers tries to convert a slow tokenizer
# and says only that sentencepiece or tiktoken is needed, naming neither the folder nor the files.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


class LoadError(ValueError):
    """A model that cannot be loaded: one line naming the folder (or name), what is wrong and what to pass instead.
    A ``ValueError``, so a caller that catches those keeps working."""


def _folder(path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise LoadError(f"no such folder {path}; pass {what}")
    if not path.is_dir():
        raise LoadError(f"{path} is a file, not a folder; pass {what}")
    return path


def _class_name(config_file: Path) -> Optional[str]:
    try:
        return json.loads(config_file.read_text()).get("_class_name")
    except (OSError, ValueError) as e:
        raise LoadError(f"cannot read {config_file}: {e}") from e


def check_tokenizer_files(folder: Path, what: str, needed: tuple[str, ...] = TOKENIZER_FILES) -> None:
    """Raise :class:`LoadError` if ``folder`` holds none of ``needed`` (the files a tokenizer loads from)."""
    if not any((Path(folder) / name).is_file() for name in needed):
        missing = f"no {needed[0]}" if len(needed) == 1 else f"none of {', '.join(needed)}"
        raise LoadError(f"cannot load the {what} from {folder}: it has no tokenizer ({missing}); save the model's "
                        f"tokenizer there (`tokenizer.save_pretrained('{folder}')`), or copy its tokenizer files from "
                        f"the model it came from")


def _transformer(folder: Path):
    from diffusers import DiTTransformer2DModel

    from ..uem.uem_folder import load_pretrained

    name = _class_name(folder / "config.json")
    if name != "DiTTransformer2DModel":
        raise LoadError(f"{folder} holds a {name}; DeeDiff's trainer, calibration and batch generation run a "
                        f"class-conditional DiTTransformer2DModel (PixArt and SD3 need captions)")
    try:
        # Computed in fp32 whatever the stored dtype (the embedded model ships fp16).
        return load_pretrained(DiTTransformer2DModel, folder, "DiTTransformer2DModel",
                               "pass a folder that save_pretrained wrote whole")
    except ValueError as e:  # its message says "cannot load the DiTTransformer2DModel", where, and the fix
        raise LoadError(str(e)) from None


def load_dit_pipeline(path: Optional[Path], device="cpu"):
    """The pipeline in ``path``, or the embedded digits DiT when it is None, in float32 with its progress bar off."""
    from ..uem.digits.embedded import load_embedded_pipeline
    from ..uem.digits.files import DIT_DIR
    from ..uem.digits.pipeline import DigitsDiTPipeline

    if path is None:
        try:
            pipe = load_embedded_pipeline(device)
        except FileNotFoundError as e:
            raise LoadError(str(e)) from None
        pipe.set_progress_bar_config(disable=True)
        return pipe
    folder = _folder(path, "a diffusers DiT pipeline folder (model_index.json) or a DiTTransformer2DModel folder "
                           "(config.json), or leave it out for the embedded digits DiT")
    try:
        if (folder / "model_index.json").is_file():
            try:
                name = _class_name(folder / "model_index.json")
            except LoadError as e:
                raise LoadError(f"cannot load the image pipeline from {folder}: {e}") from None
            if name not in PIPELINES:
                raise LoadError(f"{folder} holds a {name}; this runs {' or '.join(PIPELINES)}")
            if name == "DiTPipeline":
                from diffusers import DiTPipeline as cls
            else:
                cls = DigitsDiTPipeline
            pipe = cls.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
        elif (folder / "config.json").is_file():
            from diffusers import DDIMScheduler

            scheduler = DDIMScheduler.from_pretrained(DIT_DIR / "scheduler")
            pipe = DigitsDiTPipeline(transformer=_transformer(folder), scheduler=scheduler)
        else:
            raise LoadError(f"{folder} is not a diffusers pipeline folder (no model_index.json) nor a model folder "
                            f"(no config.json); pass the folder that pipe.save_pretrained (or `diffexit train image "
                            f"--export DIR`) wrote")
    except LoadError:
        raise
    except Exception as e:  # a broken or partial folder: say which, and why
        raise LoadError(f"cannot load the image pipeline from {folder}: {e}") from e
    pipe.transformer.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_dit_backbone(path: Optional[Path]):
    """``(transformer, vae or None, noise scheduler)`` for training on the DiT in ``path`` (None: the embedded one).

    The noise scheduler is DDPM on the pipeline's own training schedule; a bare transformer folder carries none, so
    it gets diffusers' DDPM default, the one DiT trains with.
    """
    from diffusers import AutoencoderKL, DDPMScheduler

    from ..uem.digits.files import DIT_COMMAND, DIT_DIR

    if path is None and not (DIT_DIR / "model_index.json").is_file():
        raise LoadError(f"the embedded digits DiT is missing from {DIT_DIR}; make it with `{DIT_COMMAND}`, or "
                        f"pass --model")
    folder = DIT_DIR if path is None else _folder(path, "a DiT pipeline folder or DiTTransformer2DModel folder, or "
                                                        "leave it out for the embedded digits DiT")
    try:
        if (folder / "model_index.json").exists():
            transformer = _transformer(folder / "transformer")
            vae = (AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32) if (folder / "vae").is_dir()
                   else None)
            sched_dir = folder / "scheduler"
            scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(sched_dir)) if sched_dir.is_dir() else None
        elif (folder / "config.json").exists():
            transformer, vae, scheduler = _transformer(folder), None, None
        else:
            raise LoadError(f"{folder} is neither a diffusers model directory (config.json) nor a pipeline "
                            f"directory (model_index.json)")
    except LoadError:
        raise
    except Exception as e:  # a broken VAE or scheduler: say which folder, and why
        raise LoadError(f"cannot load the DiT backbone from {folder}: {e}") from e
    scheduler = scheduler or DDPMScheduler()
    if scheduler.config.prediction_type != "epsilon":
        raise LoadError(f"the DeeDiff loss is on predicted noise, but the model in {folder} predicts "
                        f"{scheduler.config.prediction_type!r}")
    return transformer, vae, scheduler


def uem_heads_dir(directory: Path) -> Path:
    """Where the heads of a UEM folder sit: ``DIR/uem`` in a ``diffexit train uem --out DIR`` run, else ``DIR``."""
    directory = Path(directory)
    return directory / "uem" if (directory / "uem" / "config.json").is_file() else directory


def load_uem(directory: Path):
    """``(UEMStack, fine-tuned transformer or None, heads folder)`` from a UEM folder, in float32, eval mode.

    The folder is what ``diffexit train uem --out DIR`` writes, or a bare ``UEMStack.save_pretrained`` folder; the
    layout, and the backbone it may bring, are :mod:`diffexit.uem.uem_folder`'s. The calibration files sit beside
    the heads.
    """
    from ..uem.uem_folder import load_uem_folder

    try:
        folder = load_uem_folder(directory)
    except ValueError as e:  # its message names the folder, what is wrong and the fix
        raise LoadError(str(e)) from None
    return folder.uem, folder.backbone, folder.heads


def with_backbone(pipe, transformer):
    """``pipe`` itself, or (``transformer`` given: the fine-tuned backbone UEM heads were trained with) a pipeline of
    the same class and scheduler around it."""
    if transformer is None:
        return pipe
    out = type(pipe)(**{**pipe.components, "transformer": transformer.to(pipe.transformer.device)})
    out.set_progress_bar_config(disable=True)
    return out


def default_guidance_scale(pipe) -> float:
    """The ``guidance_scale`` that ``pipe``'s ``__call__`` uses when none is given."""
    return float(inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default)


def embedded_text_models() -> dict[str, Path]:
    """The shipped text models by the names every ``--model`` takes."""
    from ..dllm.charlm.gemma import GEMMA_WEIGHTS_DIR
    from ..dllm.charlm.model import BLOCK_WEIGHTS_DIR, WEIGHTS_DIR

    return {"charlm": WEIGHTS_DIR, "charlm-block": BLOCK_WEIGHTS_DIR, "gemma": GEMMA_WEIGHTS_DIR}


def resolve_text_model(name, *, hub: bool = False) -> Optional[Path]:
    """The folder a ``--model`` value names: an embedded model's name, or a folder that exists; None stays None.
    With ``hub``, an ``owner/name`` Hub id already in the local Hugging Face cache names its cached snapshot. Anything
    else is a :class:`LoadError` that lists the embedded names, said at once: nothing is downloaded here."""
    if name is None:
        return None
    embedded = embedded_text_models()
    if str(name) in embedded:
        return embedded[str(name)]
    path = Path(name).expanduser()
    if path.exists():
        return path
    if hub and "/" in str(name) and not str(name).startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        try:
            return Path(snapshot_download(str(name), local_files_only=True))
        except (HFValidationError, LocalEntryNotFoundError):
            raise LoadError(f"cannot load the text model {name}: no such folder, not an embedded model, and not in "
                            f"the local Hugging Face cache (nothing is downloaded here); download it first (`hf "
                            f"download {name}`), or pass a model folder or one of {list(embedded)}") from None
    raise LoadError(f"cannot load the text model {name}: no such folder, and not an embedded model; pass a model "
                    f"folder{', a Hub id (owner/name) in the local Hugging Face cache,' if hub else ''} or one of "
                    f"{list(embedded)}")


def load_text_model_or_embedded(path: Optional[Path], dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: the exported model folder ``path`` (``diffexit train text --export``) or embedded name,
    or the embedded model when it is None."""
    from ..dllm.charlm.model import load_embedded_text_model, load_text_model

    if path is None:
        return _loaded("text model", None, lambda: load_embedded_text_model(dtype=dtype))
    folder = _folder(resolve_text_model(path), "an exported text model folder (`diffexit train text --export DIR`)")
    if not (folder / "config.json").is_file():
        raise LoadError(f"cannot load the text model from {path}: no config.json there; pass the folder that "
                        f"`diffexit train text --export DIR` wrote")
    check_tokenizer_files(folder, "text model", ("tokenizer.json",))
    return _loaded("text model", path, lambda: load_text_model(folder, dtype=dtype))


def load_gemma_or_embedded(path: Optional[Path], dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: a DiffusionGemma folder ``path`` (or embedded name), or the embedded one when it is
    None."""
    from ..dllm.charlm.gemma import load_embedded_gemma_model, load_gemma_model

    if path is None:
        return _loaded("DiffusionGemma model", None, lambda: load_embedded_gemma_model(dtype=dtype))
    folder = _folder(resolve_text_model(path), "a DiffusionGemma model folder")
    check_tokenizer_files(folder, "DiffusionGemma model", ("tokenizer.json",))
    return _loaded("DiffusionGemma model", path, lambda: load_gemma_model(folder, dtype=dtype))


def load_masked_diffusion_pipeline(name, *, dtype: torch.dtype, device, **options):
    """A :class:`~diffexit.dllm.pipeline.MaskedDiffusionPipeline` around the transformers model ``name`` (a folder, or
    a Hub id in the local cache), its progress bar off; ``options`` are ``from_transformers``' (``loop``,
    ``mask_id``, ``trust_remote_code``)."""
    from ..dllm.pipeline import MaskedDiffusionPipeline

    folder = _folder(resolve_text_model(name, hub=True), "a model folder or a Hub id (owner/name)")
    check_tokenizer_files(folder, "text model")
    pipe = _loaded("text model", name, lambda: MaskedDiffusionPipeline.from_transformers(
        str(folder), torch_dtype=dtype, device=device, **options))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _loaded(what: str, where, load):
    """``load()``, any failure (missing files, a broken config, missing weights) a :class:`LoadError` saying which
    model, where (None: the embedded one), and why."""
    from safetensors import SafetensorError

    try:
        return load()
    except LoadError:
        raise
    except SafetensorError as e:
        # safetensors' own message ("incomplete metadata, file not fully covered") names neither the file's state
        # nor a fix; a truncated copy or an interrupted save is the usual cause.
        raise LoadError(f"cannot load the {what} from {where or 'the package'}: its weights file is unreadable "
                        f"(truncated, or not a safetensors file: {e}); copy or export the folder again, whole") from None
    except Exception as e:
        if where is None and isinstance(e, FileNotFoundError):  # the embedded loaders' own message names the fix
            raise LoadError(str(e)) from None
        raise LoadError(f"cannot load the {what} from {where or 'the package'}: {e}") from e


def class_count(pipe) -> int:
    """How many classes ``pipe`` draws: the digits for ``DigitsDiTPipeline``; for ``DiTPipeline``, the rows of its
    label table (it keeps one more, the null class that guidance uses)."""
    from ..uem.digits.data import NUM_CLASSES
    from ..uem.digits.pipeline import DigitsDiTPipeline

    return NUM_CLASSES if isinstance(pipe, DigitsDiTPipeline) else int(pipe.transformer.config.num_embeds_ada_norm)
