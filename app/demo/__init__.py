"""``diffexit demo``: the Gradio app (DeeDiff on images, SchED on text), served on 127.0.0.1 by default.

- ``app``: the page (``build_app``) and the command line (``main``); ``serve``: the server settings (``launch``).
- ``images``, ``text``: what each tab's button runs.
- ``models``: the models, loaded on first use and shared; ``streaming``: a decode streamed to the page;
  ``forms``: the checks that turn bad form values into one-line errors.
"""

from .app import MAX_QUEUE, TEXT_CONCURRENCY, Demo, build_app, main
from .forms import MAX_IMAGE_STEPS, MAX_IMAGES, MAX_TEXT_STEPS
from .images import GRID_CELL_PIXELS, GRID_COLUMNS, image_grid
from .models import Models
from .serve import launch
from .text import EOS_GLYPH, MASK_GLYPH, example, span_text, task_of

__all__ = ["Demo", "Models", "build_app", "launch", "main", "example", "image_grid", "span_text", "task_of",
           "EOS_GLYPH", "MASK_GLYPH", "GRID_CELL_PIXELS", "GRID_COLUMNS", "MAX_QUEUE", "MAX_TEXT_STEPS",
           "MAX_IMAGE_STEPS", "MAX_IMAGES", "TEXT_CONCURRENCY"]
