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

__version__ = "0.1.0"
