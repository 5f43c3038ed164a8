"""Throughput of ``diffexit generate images|text`` at batch sizes 1, 4 and 16, full against early exits, in one run.

    python benchmarks/generate_throughput.py [--images 16] [--image-steps 20] [--prompts 32] [--threads 1]
                                             [--uem DIR] [--text-model DIR]

Each row is one call of the command's ``run`` into a fresh folder: the same items at one batch size with one
method, one process. Items per second count the whole job (generation, PNG encoding, atomic writes, the manifest
merge) but not model loading. Speedups are against full depth / full steps at the same batch size, in this run.

- Images: full depth, the static depth schedule 4/8/12 blocks by thirds (scaled to the model's depth), and DeeDiff
  at ``--threshold`` with the UEMs of ``--uem DIR``, or random ones shaped for the model when none are given (then
  only its speed at the layer ratio it reaches means something).
- Text: full steps and SchED (``--schedule``, the paper's cosine 7.5 -> 2.5 by default) on held-out ``sort``
  prompts, decoded in the embedded model's short layout (16 steps for a 16-token span).

The embedded models are used when they have been exported (or ``--text-model DIR``). Otherwise the benchmark says
so and uses stand-ins of the same shapes with random weights (a 12-block 16x16 DiT; a 4-layer, width-256
bidirectional Llama): their speed is representative, but what they generate is noise, and where their rules stop
is arbitrary.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path

import torch

BATCH_SIZES = (1, 4, 16)


def stand_in_pipeline(root: Path) -> Path:
    """A random 12-block, 16x16 digits DiT pipeline (the embedded model's shape), saved under ``root``."""
    from diffusers import DiTTransformer2DModel

    from diffexit.uem.pipeline import DigitsDiTPipeline
    from diffexit.uem.train_backbone import build_sampling_scheduler

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1,
                                        num_layers=12, sample_size=16, patch_size=2, num_embeds_ada_norm=1000).eval()
    DigitsDiTPipeline(transformer=transformer, scheduler=build_sampling_scheduler()).save_pretrained(root / "pipe")
    return root / "pipe"


def random_uem(root: Path, transformer_config: dict) -> Path:
    """Random UEMs shaped for a DiT with ``transformer_config``, saved under ``root``; their exits cost what
    trained ones cost, but where they exit means nothing."""
    from diffexit.uem import UEMStack

    hidden = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    torch.manual_seed(1)
    uem = UEMStack(num_blocks=transformer_config["num_layers"], hidden_size=hidden, model_class="DiTTransformer2DModel")
    with torch.no_grad():
        uem.cond_weight.copy_(torch.randn_like(uem.cond_weight) / hidden)
    uem.save_pretrained(root / "uem")
    return root / "uem"


def stand_in_text_model(root: Path) -> Path:
    """A random bidirectional Llama of the embedded model's shape (width 256, 4 layers) and its tokenizer."""
    from diffexit.dllm.text_model import DiffusionLlama, text_model_config
    from diffexit.dllm.tokenizer import build_tokenizer

    tok = build_tokenizer()
    config = text_model_config(len(tok), tok.pad_token_id, hidden_size=256, num_layers=4, num_heads=4,
                               max_positions=272)
    torch.manual_seed(0)
    DiffusionLlama(config).eval().save_pretrained(root / "text")
    tok.save_pretrained(root / "text")
    return root / "text"


def _run(module, argv: list[str], out: Path):
    # The command's summary and progress bars would bury the table; its errors still raise.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        result, _ = module.run([*argv, "--out", str(out)])
    return result


def image_rows(root: Path, pipe_args: list[str], uem: Path, n: int, steps: int, threshold: str,
               num_blocks: int) -> list[dict]:
    from diffexit.app import generate_images

    third = max(num_blocks // 3, 1)
    methods = [("full", []),
               ("static", ["--method", "static", "--depths", str(third), str(2 * third), str(num_blocks)]),
               ("deediff", ["--method", "deediff", "--threshold", threshold, "--uem", str(uem)])]
    requests = root / "requests.jsonl"
    requests.write_text("".join(json.dumps({"id": f"img{i:04d}", "class": i % 10}) + "\n" for i in range(n)))
    base = ["--requests", str(requests), *pipe_args, "--steps", str(steps)]
    _run(generate_images, [*base, "--batch-size", "4"], root / "warm-up")
    rows = []
    for batch in BATCH_SIZES:
        full = None
        for name, extra in methods:
            result = _run(generate_images, [*base, *extra, "--batch-size", str(batch)], root / f"{name}-b{batch}")
            ratio = sum(r["layer_ratio"] for r in result.records) / len(result.records)
            full = full or result.throughput
            rows.append({"what": "images", "method": name, "batch": batch, "items": result.items,
                         "throughput": result.throughput, "speedup": result.throughput / full, "layer_ratio": ratio})
    return rows


def text_rows(root: Path, model_args: list[str], n: int, schedule: str) -> list[dict]:
    from diffexit.app import generate_text

    base = ["--task", "sort", "--n", str(n), *model_args]
    methods = [("full", []), ("sched", ["--method", "sched", "--schedule", schedule])]
    _run(generate_text, [*base, "--batch-size", "4"], root / "warm-up-text")
    rows = []
    for batch in BATCH_SIZES:
        full = None
        for name, extra in methods:
            result = _run(generate_text, [*base, *extra, "--batch-size", str(batch)], root / f"text-{name}-b{batch}")
            nfe = sum(r["nfe"] for r in result.records) / len(result.records)
            full = full or result.throughput
            rows.append({"what": "text", "method": name, "batch": batch, "items": result.items,
                         "throughput": result.throughput, "speedup": result.throughput / full, "nfe": nfe})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=16, help="images per row (default: %(default)s)")
    p.add_argument("--image-steps", type=int, default=20, help="DDIM steps (default: %(default)s)")
    p.add_argument("--threshold", default="0.5", help="DeeDiff threshold (default: %(default)s)")
    p.add_argument("--uem", type=Path, help="UEMs for the embedded DiT (default: random ones, speed only)")
    p.add_argument("--text-model", type=Path, help="an exported text model folder (default: the embedded one)")
    p.add_argument("--prompts", type=int, default=32, help="prompts per row (default: %(default)s)")
    p.add_argument("--schedule", default="cosine:7.5:2.5", help="SchED threshold schedule (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: %(default)s; small models on shared cores run much slower with "
                        "more, as OpenMP threads spin against each other)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from diffexit.app.reporting import markdown_table
    from diffexit.dllm.text_model import WEIGHTS_DIR as TEXT_DIR
    from diffexit.uem.embedded import DIT_DIR

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if (DIT_DIR / "model_index.json").is_file():
            print(f"images: the embedded digits DiT ({DIT_DIR})")
            pipe_dir, pipe_args = DIT_DIR, []
        else:
            print(f"images: no embedded DiT in {DIT_DIR}; using a RANDOM stand-in of its shape (12 blocks, 16x16): "
                  f"speed only, the images are noise")
            pipe_dir = stand_in_pipeline(root)
            pipe_args = ["--pipeline", str(pipe_dir)]
        transformer_config = json.loads((pipe_dir / "transformer" / "config.json").read_text())
        uem = args.uem
        if uem is None:
            print("images: no --uem; DeeDiff runs on RANDOM UEMs: its speed at the layer ratio shown is real, which "
                  "blocks it skips is arbitrary")
            uem = random_uem(root, transformer_config)
        if args.text_model is not None:
            print(f"text: {args.text_model}")
            model_args = ["--model", str(args.text_model)]
        elif (TEXT_DIR / "model.safetensors").is_file():
            print(f"text: the embedded text model ({TEXT_DIR})")
            model_args = []
        else:
            print(f"text: no embedded text model in {TEXT_DIR}; using a RANDOM stand-in of its shape (width 256, 4 "
                  f"layers): speed only, where SchED halts is arbitrary")
            model_args = ["--model", str(stand_in_text_model(root))]
        print(f"torch threads: {torch.get_num_threads()}; {args.images} images at {args.image_steps} steps, "
              f"{args.prompts} sort prompts at 16 steps per row\n")
        rows = image_rows(root, pipe_args, uem, args.images, args.image_steps, args.threshold,
                          transformer_config["num_layers"])
        rows += text_rows(root, model_args, args.prompts, args.schedule)
    print(markdown_table(rows, [("what", "output", ""), ("method", "method", ""), ("batch", "batch", ""),
                                ("items", "items", ""), ("throughput", "items/s", ".2f"),
                                ("speedup", "vs full", ".2f"), ("layer_ratio", "layer ratio", ".3f"),
                                ("nfe", "mean NFE", ".2f")]))


if __name__ == "__main__":
    main()
