"""What a decoding step costs beside the model's forward pass, as a fraction of that pass, measured side by side.

    python benchmarks/halting_overhead.py [--repeats 5] [--batches 1 32 64] [--layouts short long]

Times ``diffexit.dllm.generate`` twice per setting on the same prompts: once with the shipped text model, and
once with a stand-in that returns that model's logits, precomputed, at no cost. The second run is everything a step
does besides the forward pass: token statistics, the halting rule, the commit and the batch bookkeeping. Rows:
no halting rule (the commit alone) and SchED that never halts (the rule decides at every step, the worst case), for
the short (24 + 16, 4 blocks of 4) and long (24 + 136, 4 blocks of 34) layouts.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from diffexit.common.schedules import ThresholdSchedule
from diffexit.dllm import SchED, generate
from diffexit.dllm.charlm.model import load_embedded_text_model
from diffexit.dllm.charlm.tasks import DECODE, LAYOUTS


class Replay(torch.nn.Module):
    """Returns fixed logits ``[B, N, V]`` for the rows it is given: a model whose forward pass costs nothing.

    The loop runs the active rows only; which rows they are does not matter for timing, so it returns the first
    ``A`` rows of the table.
    """

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.config = SimpleNamespace(vocab_size=logits.shape[-1])

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.logits[: input_ids.shape[0], : input_ids.shape[1]])


def _seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 64])
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    args = p.parse_args()
    if args.repeats < 1 or min(args.batches) < 1:
        p.error("--repeats and --batches must be positive")
    model, tok = load_embedded_text_model()
    never = ThresholdSchedule("constant", 1e9, 1e9)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"threads={torch.get_num_threads()} model={n_params / 1e6:.2f}M parameters, vocab={len(tok)}")
    print("| layout | batch | rule | forward ms / step | rest ms / step | rest / forward |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.layouts:
        layout = LAYOUTS[name]
        block, steps = DECODE[layout.span_length]
        for batch in args.batches:
            gen = torch.Generator().manual_seed(0)
            ids = torch.randint(4, len(tok), (batch, layout.prompt_length), generator=gen)
            with torch.no_grad():
                table = model(torch.cat([ids, torch.full((batch, layout.span_length), tok.mask_token_id)], 1)).logits
            replay = Replay(table)
            for label, rule in (("none", None), ("SchED, never halts", lambda: SchED(never))):
                def decode(m):
                    return lambda: generate(m, ids, gen_length=layout.span_length, steps=steps, block_length=block,
                                            mask_id=tok.mask_token_id, halting=rule() if rule else None)

                whole = _seconds(decode(model), args.repeats) / steps
                rest = _seconds(decode(replay), args.repeats) / steps
                forward = whole - rest
                print(f"| {name} | {batch} | {label} | {1e3 * forward:.2f} | {1e3 * rest:.3f} | "
                      f"{100 * rest / forward:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
