"""Per-block cost of a DeeDiff UEM, as a fraction of the block's own cost (goal: under 3%).

The model is a 12-block ``DiTTransformer2DModel`` shaped like the embedded digits DiT: 1 channel, 16x16 input,
patch 2 (64 tokens), 32-wide heads, 1000 classes. Everything is timed side by side in one run, in interleaved
rounds; each figure is the fastest round (on shared cores the fastest round is the one least disturbed by others):

- ``block``: one transformer block;
- ``uem``: one block's UEM (conditioned token head, sigmoid, mean over tokens), plus its share
  (1/12) of folding the conditioning into all heads once per forward;
- ``check``: what the early-exit loop adds after a block: the rule (``UncertaintyThreshold``) computing that
  UEM, comparing with its threshold, and the count of stopping samples read back.

Whole-forward differences are not reported: on shared CPU cores they are below the run-to-run noise of a forward.

    python benchmarks/uem_overhead.py [--hidden 128 256] [--batch 1 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from diffexit.uem import UEMStack, UncertaintyThreshold
from diffexit.uem.heads import token_uncertainty

LAYERS = 12
HEAD_DIM = 32


def build(hidden: int):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=hidden // HEAD_DIM, attention_head_dim=HEAD_DIM, in_channels=1, num_layers=LAYERS,
        sample_size=16, patch_size=2, num_embeds_ada_norm=1000,
    ).eval()
    return model, UEMStack.for_model(model)


def per_call_ms(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) * 1e3 / calls


def measure(hidden: int, batch: int, rounds: int) -> dict:
    model, uem = build(hidden)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 16, 16, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    block = model.transformer_blocks[LAYERS // 2]
    h = model.pos_embed(x)
    cond = model.transformer_blocks[0].norm1.emb(t, y, hidden_dtype=h.dtype)
    w, b = uem.token_heads(cond)
    index = LAYERS // 2

    def run_block():
        block(h, timestep=t, class_labels=y)

    def run_uem():
        token_uncertainty(h, w[index], b[index]).mean(dim=1)

    def run_heads():
        uem.token_heads(cond)

    rule = UncertaintyThreshold(0.0)

    def run_check():
        stop = rule.exits(index + 1, None, lambda: token_uncertainty(h, w[index], b[index]).mean(dim=1))
        int(stop.sum())

    runs = {"block": run_block, "uem": run_uem, "heads": run_heads, "check": run_check}
    times = {k: [] for k in runs}
    calls = 50 if batch == 1 else 10
    with torch.no_grad():
        for fn in runs.values():
            per_call_ms(fn, 3)
        for _ in range(rounds):
            for name, fn in runs.items():
                times[name].append(per_call_ms(fn, calls))
    best = {k: min(v) for k, v in times.items()}
    uem_ms = best["uem"] + best["heads"] / LAYERS
    check_ms = best["check"] + best["heads"] / LAYERS
    return {
        "hidden": hidden,
        "batch": batch,
        "block_ms": best["block"],
        "uem_ms": uem_ms,
        "uem_frac": uem_ms / best["block"],
        "check_frac": check_ms / best["block"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 256], help="model widths (multiples of 32)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (the fastest is reported)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 avoids OpenMP threads fighting over shared cores)")
    args = parser.parse_args(argv)
    if any(h % HEAD_DIM for h in args.hidden):
        parser.error(f"--hidden must be multiples of {HEAD_DIM}")
    torch.set_num_threads(args.threads)
    print(f"12-block DiT, 16x16x1 input, patch 2 (64 tokens); torch {torch.__version__}, {args.threads} thread(s)\n")
    print("| hidden | batch | block ms | UEM ms | UEM / block | exit check / block |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for hidden in args.hidden:
        for batch in args.batch:
            r = measure(hidden, batch, args.rounds)
            print(f"| {r['hidden']} | {r['batch']} | {r['block_ms']:.3f} | {r['uem_ms']:.4f} | {r['uem_frac']:.1%} "
                  f"| {r['check_frac']:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
