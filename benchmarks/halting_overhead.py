"""Halting-rule overhead per decoding step, as a fraction of one forward pass, measured side by side.

    python benchmarks/halting_overhead.py [--repeats 20] [--vocab V]

Per step, a halting rule costs ``token_stats`` over the span logits plus the rule's aggregation. This times
both against the model's forward pass at batch 1 and 32, on a bidirectional Llama shaped like the embedded
text model (hidden 256, 4 layers, 4 heads), for the short (24 + 16) and long (136 + 136) layouts.
``--vocab`` lets you see how the ratio moves with a large vocabulary (the stats scale with V, the forward
pass mostly does not until the head dominates).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from diffexit.dllm import SchED
from diffexit.kernels import token_stats


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--vocab", type=int, default=100)
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, is_causal=False)
    model = LlamaForCausalLM(cfg).eval()
    rule = SchED()
    print(f"threads={torch.get_num_threads()} vocab={args.vocab}")
    print("| layout | batch | forward ms | stats + rule ms | overhead |")
    print("| --- | --- | --- | --- | --- |")
    for name, (plen, span) in {"short": (24, 16), "long": (136, 136)}.items():
        for batch in (1, 32):
            x = torch.randint(0, args.vocab, (batch, plen + span))
            with torch.no_grad():
                logits = model(x).logits
            masked = torch.ones(batch, span, dtype=torch.bool)
            progress = torch.full((batch,), 0.5)
            rows = torch.arange(batch)
            rule.start(batch, span, x.device)

            def forward():
                with torch.no_grad():
                    model(x)

            def halting():
                rule.decide(token_stats(logits[:, plen:]), masked, progress, rows)

            f_ms, h_ms = _time(forward, args.repeats), _time(halting, args.repeats)
            print(f"| {name} | {batch} | {f_ms:.2f} | {h_ms:.3f} | {100 * h_ms / f_ms:.2f}% |")


if __name__ == "__main__":
    main()
