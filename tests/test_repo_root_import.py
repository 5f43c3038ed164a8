"""Python started in the repository root (``python -c``, a notebook, a script there) has the root on sys.path, where
the ``kernels/`` folder (``diffexit.kernels``) could shadow Hugging Face's ``kernels``, which transformers imports
as it loads a model. Both orders of import work there, and each name means its own package."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import kernels, pathlib
assert hasattr(kernels, "CUDAProperties"), kernels.__file__
assert pathlib.Path(kernels.__file__).resolve().parent != pathlib.Path.cwd() / "kernels", kernels.__file__
import torch
from diffexit.kernels import token_stats
assert token_stats(torch.tensor([[0.0, 2.0, 1.0]])).top1_id.tolist() == [1]
print("ok")
"""


@pytest.mark.parametrize("first", [
    "import diffexit; import diffusers; from diffusers import DiTPipeline; import transformers",
    # transformers' model code imports `kernels` when it loads: without diffexit imported first, nothing else
    # stands between it and the root's folder.
    "import transformers.modeling_utils; from transformers import LlamaForCausalLM; from diffusers import DiTPipeline",
])
def test_diffusers_and_transformers_import_from_the_repository_root(first):
    done = subprocess.run([sys.executable, "-c", first + "\n" + CHECK], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
