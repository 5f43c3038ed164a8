"""diffexit: cheaper diffusion sampling by not doing work that no longer changes the answer.

Subpackages (each a top-level folder of the repository, see DESIGN.md):

- ``diffexit.kernels``  -- ``token_stats``: fused argmax / top-2 / margin / entropy over logits.
- ``diffexit.samplers`` -- ``ThresholdSchedule`` and the diffusers-compatible schedulers.
- ``diffexit.dllm``     -- masked-diffusion LM decoding with SchED halting.
- ``diffexit.uem``      -- DeeDiff uncertainty heads and early exits for diffusers transformers.
- ``diffexit.app``      -- the ``diffexit`` command line and the Gradio demo.
"""

__version__ = "0.1.0"
