"""Throughput of ``diffexit generate images|text`` at batch sizes 1, 4 and 16, full against early exits, in one run.

    python benchmarks/generate_throughput.py [--images 16] [--image-steps 20] [--prompts 32] [--threads 1]
                                             [--batches 1 4 16] [--uem DIR] [--text-model DIR]

Each row is one call of the command's ``run`` into a fresh folder: the same items at one batch size with one
method, one process. Items per second count the whole job (generation, PNG encoding, atomic writes, the manifest
merge) but not model loading. Speedups are against full depth / full steps at the same batch size, in this run.

- Images: full depth, the static depth schedule by thirds (4/8/12 blocks on the embedded DiT), and DeeDiff at
  ``--threshold`` with the shipped exit-cost UEMs (or ``--uem DIR``), on the embedded digits DiT.
- Text: full steps and SchED (``--schedule``, the paper's cosine 7.5 -> 2.5 by default) on held-out ``pick``
  prompts with the embedded model (or ``--text-model DIR``), decoded in its short layout (a 16-token span in 4
  blocks of 4, 16 steps).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path

import torch



def _run(module, argv: list[str], out: Path):
    # The command's summary and progress bars would bury the table; its errors still raise.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        result, _ = module.run([*argv, "--out", str(out)])
    return result


def sweep(module, what: str, base: list[str], methods: list[tuple[str, list[str]]], root: Path,
          figure: str, batches: list[int]) -> list[dict]:
    """One row per batch size and method: ``module``'s job on the same items, its throughput, its speedup over the
    first method (full) at that batch size, and the mean of the per-item record field ``figure``."""
    _run(module, [*base, "--batch-size", "4"], root / f"warm-up-{what}")
    rows = []
    for batch in batches:
        full = None
        for name, extra in methods:
            result = _run(module, [*base, *extra, "--batch-size", str(batch)], root / f"{what}-{name}-b{batch}")
            full = full or result.throughput
            rows.append({"what": what, "method": name, "batch": batch, "items": result.items,
                         "throughput": result.throughput, "speedup": result.throughput / full,
                         figure: sum(r[figure] for r in result.records) / len(result.records)})
    return rows


def image_rows(root: Path, uem: Path, n: int, steps: int, threshold: str, num_blocks: int,
               batches: list[int]) -> list[dict]:
    from diffexit.app import generate_images

    third = max(num_blocks // 3, 1)
    methods = [("full", []),
               ("static", ["--method", "static", "--depths", str(third), str(2 * third), str(num_blocks)]),
               ("deediff", ["--method", "deediff", "--threshold", threshold, "--uem", str(uem)])]
    requests = root / "requests.jsonl"
    requests.write_text("".join(json.dumps({"id": f"img{i:04d}", "class": i % 10}) + "\n" for i in range(n)))
    base = ["--requests", str(requests), "--steps", str(steps)]
    return sweep(generate_images, "images", base, methods, root, "layer_ratio", batches)


def text_rows(root: Path, model_args: list[str], n: int, schedule: str, batches: list[int]) -> list[dict]:
    from diffexit.app import generate_text

    base = ["--task", "pick", "--n", str(n), *model_args]
    methods = [("full", []), ("sched", ["--method", "sched", "--schedule", schedule])]
    return sweep(generate_text, "text", base, methods, root, "nfe", batches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=16, help="images per row (default: %(default)s)")
    p.add_argument("--image-steps", type=int, default=20, help="DDIM steps (default: %(default)s)")
    p.add_argument("--threshold", default="0.05", help="DeeDiff threshold (default: %(default)s)")
    p.add_argument("--uem", type=Path, help="UEMs for the embedded DiT (default: the shipped exit-cost heads)")
    p.add_argument("--text-model", type=Path, help="an exported text model folder (default: the embedded one)")
    p.add_argument("--prompts", type=int, default=32, help="prompts per row (default: %(default)s)")
    p.add_argument("--schedule", default="cosine:7.5:2.5", help="SchED threshold schedule (default: %(default)s)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], metavar="B",
                   help="batch sizes, one row per method each (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: %(default)s; small models on shared cores run much slower with "
                        "more, as OpenMP threads spin against each other)")
    args = p.parse_args()
    if min(args.images, args.image_steps, args.prompts, args.threads, *args.batches) < 1:
        p.error("--images, --image-steps, --prompts, --threads and --batches must be positive")
    torch.set_num_threads(args.threads)
    from diffexit.common.results import markdown_table
    from diffexit.uem.digits.embedded import embedded_uem_dir
    from diffexit.uem.digits.files import DIT_DIR

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        uem = args.uem or embedded_uem_dir()
        model_args = ["--model", str(args.text_model)] if args.text_model is not None else []
        print(f"images: {DIT_DIR}, UEMs {uem}; text: {args.text_model or 'the embedded model'}")
        transformer_config = json.loads((DIT_DIR / "transformer" / "config.json").read_text())
        print(f"torch threads: {torch.get_num_threads()}; {args.images} images at {args.image_steps} steps, "
              f"{args.prompts} pick prompts at 16 steps per row\n")
        rows = image_rows(root, uem, args.images, args.image_steps, args.threshold, transformer_config["num_layers"],
                          args.batches)
        rows += text_rows(root, model_args, args.prompts, args.schedule, args.batches)
    print(markdown_table(rows, [("what", "output", ""), ("method", "method", ""), ("batch", "batch", ""),
                                ("items", "items", ""), ("throughput", "items/s", ".2f"),
                                ("speedup", "vs full", ".2f"), ("layer_ratio", "layer ratio", ".3f"),
                                ("nfe", "mean NFE", ".2f")]))


if __name__ == "__main__":
    main()
