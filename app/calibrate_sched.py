"""``diffexit calibrate sched``: SchED thresholds with a conformal bound on the rate of answer-changing halts.

Records full-step runs of held-out prompts of the embedded tasks (seeds 1 and 2 of the held-out split: a
calibration and a validation split, disjoint from the benchmark's seed 0), then picks the most aggressive scale of
the chosen schedule whose conformal risk bound is at most ``--risk`` (:mod:`diffexit.dllm.calibrate` has the
method), and measures it on the validation split. Writes the parameters to ``--out`` (JSON), which
``diffexit generate text --config``, the demo and ``diffexit.dllm.calibrate.load_sched`` read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm.auto import tqdm

from ..common.cli_help import HelpFormatter
from ..dllm.calibrate import SCAN_STATS, evaluate, family, record, save_sched, select_scale
from ..dllm.charlm.tasks import DECODE, TASK_NAMES, layout_of, sample
from ..dllm.charlm.tokenizer import decode_answer, encode_prompts
from ..dllm.exact_cache import block_causal_layout
from ..dllm.halting import SchED
from ..dllm.statistics import SPAN, check_scanned, describe
from .models import load_text_model_or_embedded

BATCH = 50


def scanned_stat(name: str) -> str:
    """``--stat``: a statistic that calibration scans, refused with the same message as every other surface."""
    try:
        return check_scanned(name).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def record_task(model, tok, task: str, seed: int, n: int, stat: str, q: float):
    """Full-step trajectories of ``n`` held-out prompts of ``task`` (draw ``seed``), decoded as the bench does."""
    layout = layout_of(task)
    block, steps = DECODE[layout.span_length]
    examples = sample(task, "heldout", seed=seed, n=n)
    out = []
    for i in range(0, len(examples), BATCH):
        ids, attn = encode_prompts(tok, [e.prompt for e in examples[i:i + BATCH]], layout.prompt_length)
        out += record(model, ids, attn, gen_length=layout.span_length, steps=steps, block_length=block,
                      mask_id=tok.mask_token_id, decode=lambda span: decode_answer(tok, span), stat=stat, q=q,
                      ignore_token_ids=(tok.eos_token_id, tok.pad_token_id))
    return out


def main(argv: list[str], prog: str = "diffexit calibrate sched") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--risk", type=float, required=True, help="allowed rate of answer-changing halts, in (0, 1)")
    p.add_argument("--kind", default="cosine", choices=("linear", "cosine", "exp", "step"),
                   help="threshold schedule kind (default: %(default)s)")
    p.add_argument("--stat", default="min", type=scanned_stat, metavar="{" + ",".join(SCAN_STATS) + "}",
                   help=f"span statistic: {describe(SPAN, only_scanned=True)} (default: %(default)s)")
    p.add_argument("--q", type=float, default=0.1, help="quantile for --stat quantile (default: %(default)s)")
    p.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=TASK_NAMES, metavar="TASK",
                   help=f"tasks to calibrate on (default: all of {', '.join(TASK_NAMES)})")
    p.add_argument("--n-cal", type=int, default=100, help="calibration examples per task (default: %(default)s)")
    p.add_argument("--n-val", type=int, default=100, help="validation examples per task (default: %(default)s)")
    p.add_argument("--model", type=Path, default=None, help="an exported model folder (default: the embedded one)")
    p.add_argument("--out", type=Path, default=Path("sched.json"), help="parameter file to write (default: %(default)s)")
    args = p.parse_args(argv)
    if not 0 < args.risk < 1:
        p.error(f"--risk must be in (0, 1), got {args.risk}")
    if args.n_cal <= 0 or args.n_val <= 0:
        p.error("--n-cal and --n-val must be positive")
    n_total = args.n_cal * len(args.tasks)
    if 1 / (n_total + 1) > args.risk:
        p.error(f"--risk {args.risk} is below 1/(n+1) = {1 / (n_total + 1):.4f} for n = {n_total} calibration "
                f"examples; use more (--n-cal) or a larger risk")
    # The calibration takes minutes: an --out that cannot be written must fail before it, not after.
    if args.out.is_dir():
        p.error(f"--out {args.out} is a folder; give the path of the JSON file to write, e.g. {args.out / 'sched.json'}")
    if not args.out.parent.is_dir():
        p.error(f"--out {args.out}: folder {args.out.parent} does not exist; create it or give another path")
    try:
        model, tok = load_text_model_or_embedded(args.model)
    except ValueError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    if block_causal_layout(model) is not None:
        # The trajectories recorded here are whole-span halting's; said before minutes of recording start.
        print(f"{prog}: error: --model {args.model} is block-causal, and a block-causal model halts per block while "
              f"calibration records whole-span halting: calibrate the bidirectional model (--model charlm), or pick "
              f"a schedule for it with `diffexit bench text --models charlm-block`", file=sys.stderr)
        return 2
    cal, val = [], []
    for task in tqdm(args.tasks, desc="recording full-step runs"):
        cal += record_task(model, tok, task, 1, args.n_cal, args.stat, args.q)
        val += record_task(model, tok, task, 2, args.n_val, args.stat, args.q)
    scale, scan = select_scale(cal, args.kind, args.risk)
    if scale is None:
        print(f"{prog}: no scale meets risk {args.risk} on {len(cal)} examples", file=sys.stderr)
        return 1
    rule = SchED(family(args.kind, scale), stat=args.stat, q=args.q,
                 ignore_token_ids=(tok.eos_token_id, tok.pad_token_id) if args.stat == "mean_content" else ())
    calibration, validation = evaluate(cal, rule.schedule), evaluate(val, rule.schedule)
    # The guarantee holds for the decoding it was calibrated under: keep that beside the parameters.
    save_sched(args.out, rule, risk=args.risk, scale=scale, tasks=args.tasks,
               decode={str(span): {"block_length": b, "steps": st} for span, (b, st) in DECODE.items()},
               model=str(args.model) if args.model else "embedded", calibration=calibration,
               validation=validation, scan=scan)
    print(f"scale {scale}: {rule.schedule}, stat={args.stat}")
    print(f"calibration: changed {calibration['rate']:.4f} (risk {args.risk}), "
          f"NFE speedup {calibration['speedup_nfe']:.2f}x")
    print(f"validation:  changed {validation['rate']:.4f} (95% CI {validation['rate_ci95'][0]:.4f}-"
          f"{validation['rate_ci95'][1]:.4f}), NFE speedup {validation['speedup_nfe']:.2f}x on {validation['n']} "
          f"examples")
    print(f"wrote {args.out}")
    return 0
