"""Whether Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``), read at each call.

Both the dispatch (:mod:`diffexit.kernels.token_stats`) and the kernel's wrapper
(:mod:`diffexit.kernels.token_stats_triton`) ask this, so it lives apart from both.
"""

import os


def interpreting() -> bool:
    """Whether TRITON_INTERPRET=1 asks for Triton kernels to run in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
