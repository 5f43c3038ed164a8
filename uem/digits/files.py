"""Where the shipped image models live in the package, and the commands that made them.

- ``weights/dit-digits``: the class-conditional digits DiT as a ``DigitsDiTPipeline`` folder (``save_pretrained``:
  transformer in fp16 safetensors, DDIM scheduler config, MODEL_CARD.md).
- ``weights/classifier``: the digits CNN that measures generated digits (safetensors, MODEL_CARD.md).
- ``weights/uem-digits/<target>``: DeeDiff uncertainty heads for the DiT, one folder per training target
  (``UEMStack.save_pretrained`` plus ``training.json``), with ``diffexit calibrate uem`` files beside them.
- ``weights/uem-digits-exits``: the DiT fine-tuned with DeeDiff's loss so that every exit predicts the noise
  (``transformer/``, fp16, and MODEL_CARD.md), with heads per target beside it (``<target>/``, each with its
  calibrations); heads in a folder whose parent holds ``transformer/`` run on that backbone.

All are package data, so loading needs no network and no Hugging Face cache.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DIT_DIR = WEIGHTS_DIR / "dit-digits"
CLASSIFIER_DIR = WEIGHTS_DIR / "classifier"
# UEM heads for the embedded DiT, one folder per training target; the demo and `generate images` default to the
# target that wins `diffexit bench images` at matched layer ratio.
UEM_DIR = WEIGHTS_DIR / "uem-digits"
DEFAULT_UEM_TARGET = "exit-cost"
EXITS_DIR = WEIGHTS_DIR / "uem-digits-exits"
EXITS_COMMAND = ("diffexit train uem --mode full --out runs/uem-full --steps 2000 --batch-size 32 (in legs: 200, "
                 "600, 2000)")
UEM_COMMAND = "diffexit train uem --out RUN --steps 250 --batch-size 32"
# How the shipped files were made (MODEL_CARD.md has the details): a 1500-step run, extended to 3000 then 4500 steps.
DIT_COMMAND = ("diffexit train image && diffexit train image --resume --steps 3000 && "
               "diffexit train image --resume --steps 4500 --export uem/digits/weights/dit-digits")
