"""diffexit: cheaper diffusion sampling by not doing work that no longer changes the answer.

Subpackages (each a top-level folder of the repository, see docs/design.md):

- ``diffexit.common``   -- what both engines share: ``ThresholdSchedule``, results I/O, training utilities.
- ``diffexit.kernels``  -- ``token_stats``: fused argmax / top-2 / margin / entropy over logits.
- ``diffexit.dllm``     -- masked-diffusion LM decoding with SchED halting (``dllm.charlm``: the embedded model).
- ``diffexit.uem``      -- DeeDiff uncertainty heads and early exits for diffusers transformers (``uem.digits``:
  the embedded digits models).
- ``diffexit.samplers`` -- the diffusers swap-ins: ``SchEDScheduler``, ``ExitAwareScheduler``.
- ``diffexit.app``      -- the ``diffexit`` command line, batch generation, benchmarks and the Gradio demo.
"""

import os as _os
import sys as _sys

# The repository root is this package. Python puts the directory it starts in on sys.path (`python -m`,
# `accelerate launch -m diffexit.app.cli` from a checkout), and from the root our folders would import as top-level
# modules: `kernels/` would shadow Hugging Face's `kernels`, which transformers imports when it loads a model.
# Nothing is meant to be imported from the root by a top-level name, so it comes off the path.
_root = _os.path.dirname(_os.path.abspath(__file__))
_sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]

__version__ = "0.1.0"
