"""GPU check for token_stats: the Triton kernel against the torch backend at full size, then the benchmark.

On a CUDA machine, with diffexit installed (``pip install -e . --no-deps`` where torch and triton already are):

    python benchmarks/kernels_gpu.py OUT_DIR

Exits non-zero if any case disagrees. Writes OUT_DIR/kernels/results.json and its plot.
"""

import sys

import torch

from diffexit.app.cli import main as cli
from diffexit.kernels import token_stats


def cases():
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in [(1, 2048, 126464), (8, 256, 152064), (4, 262144)]:
        for dtype in (torch.float32, torch.bfloat16):
            yield f"{shape} {dtype}", (torch.randn(shape, generator=g, device="cuda") * 4).to(dtype), 1.0
    x = torch.randn(256, 8, 152064, generator=g, device="cuda", dtype=torch.bfloat16)
    yield "transposed [8, 256, 152064] bf16, T=0.7", x.transpose(0, 1), 0.7
    x = torch.randn(64, 32000, generator=g, device="cuda")
    x[:, ::3] = float("-inf")
    x[5, 100] = float("nan")
    yield "masked and NaN [64, 32000]", x, 1.0


def main(out: str) -> int:
    if not torch.cuda.is_available():
        print("kernels_gpu.py: error: needs a CUDA GPU (torch sees none); on a CPU, the test suite checks the "
              "kernel under TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    failed = 0
    for name, logits, temperature in cases():
        got = token_stats(logits, temperature=temperature, backend="triton")
        want = token_stats(logits, temperature=temperature, backend="torch")
        try:
            assert torch.equal(got.top1_id, want.top1_id), "top1_id differs"
            for field in got._fields[1:]:
                torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-5,
                                           equal_nan=True, msg=field)
            print(f"ok    {name}")
        except AssertionError as err:
            failed += 1
            print(f"FAIL  {name}: {err}")
    return cli(["bench", "kernels", "--out", f"{out}/kernels"]) or int(failed > 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs"))
