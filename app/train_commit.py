"""``diffexit train commit``: train, calibrate and validate the learned commit rule of a text model.

1. Records the model's own full-step decodes of TRAINING prompts of the embedded tasks (draw ``--seed``) and the
   features and labels of every masked position at every step (:mod:`diffexit.dllm.commit_training`).
2. Fits the classifier (seeded).
3. Calibrates a threshold per mode with conformal risk control (:func:`diffexit.dllm.calibrate.conformal_select`,
   risk = share of answers changed against full steps) on held-out draw 1: ``halt`` from one recorded full-step run
   (halting changes nothing before it fires), ``commit`` by decoding at each threshold of a scan from conservative
   to aggressive.
4. Validates both on held-out draw 2 (the benchmark's is draw 0), and writes the weights with their card.

Resumable: each recording and each decode of the scan is kept in ``--work`` (by model digest, task, draw and count),
and a rerun with the same arguments reads them back.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..common.cli_help import HelpFormatter
from ..dllm.calibrate import check_risk, conformal_select
from ..dllm.charlm.tasks import CONTROLS, DECODE, LAYOUTS, TASK_NAMES, layout_of, sample
from ..dllm.charlm.tokenizer import decode_answer, encode_prompts
from ..dllm.commit_rule import FILENAME, CommitModel, CommitRule, weights_digest
from ..dllm.commit_training import HALT_SCAN, cached as _cached, fit, halted_spans, record, summary as _summary
from ..dllm.exact_cache import block_causal_layout
from ..dllm.generate import generate
from .commit_files import data_record, write_commit_model
from .models import LoadError, load_text_model_or_embedded, resolve_text_model
from .train_commit_gemma import GEMMA_STEPS, is_gemma_folder, train_gemma

COMMAND = "diffexit train commit"
# Conservative to aggressive; the scan stops at the first threshold over the bound.
COMMIT_SCAN = (0.999, 0.995, 0.99, 0.97, 0.95, 0.9, 0.8, 0.7, 0.5)
BATCH = 64


def decode_setup(model, tok, task: str) -> dict:
    """How the bench decodes ``task`` on ``model``: lengths, blocks (a block-causal model's own), end-of-text."""
    layout = layout_of(task)
    block, steps = DECODE[layout.span_length]
    causal = block_causal_layout(model)
    return {"gen_length": layout.span_length, "steps": steps, "block_length": causal[1] if causal else block,
            "mask_id": tok.mask_token_id, "eos_token_ids": (tok.eos_token_id,) if causal else ()}


def _prompts(tok, task, split, seed, n):
    examples = sample(task, split, seed=seed, n=n)
    return [encode_prompts(tok, [e.prompt for e in examples[i:i + BATCH]], layout_of(task).prompt_length)
            for i in range(0, len(examples), BATCH)]


def _record(model, tok, task, split, seed, n):
    """Recordings of ``n`` prompts of ``task`` (a list, one per batch)."""
    kw = decode_setup(model, tok, task)
    kw.pop("eos_token_ids")  # full steps: the recorder must see the whole decode
    return [record(model, ids, attn, eos_token_ids=(tok.eos_token_id, tok.pad_token_id), **kw)
            for ids, attn in _prompts(tok, task, split, seed, n)]


def _answers(tok, spans) -> list[str]:
    return [decode_answer(tok, s) for s in spans]


def _commit_decode(model, tok, net_model, task, seed, n, threshold):
    """``(answers, nfe)`` of ``n`` held-out prompts decoded with the learned commits at ``threshold``."""
    answers, nfe = [], []
    for ids, attn in _prompts(tok, task, "heldout", seed, n):
        out = generate(model, ids, attention_mask=attn, halting=CommitRule(net_model, "commit", threshold),
                       **decode_setup(model, tok, task))
        answers += _answers(tok, out.generated)
        nfe += out.nfe.tolist()
    return answers, nfe


def main(argv: list[str], prog: str = COMMAND) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="charlm", help="an embedded model (charlm, charlm-block) or an exported folder")
    p.add_argument("--out", type=Path, default=None, help=f"weights to write (default: {FILENAME} beside the model's)")
    p.add_argument("--work", type=Path, default=None, help="recordings and scan results, for resume "
                   "(default: OUT.work)")
    p.add_argument("--seed", type=int, default=0, help="training draw and fitting seed (default: %(default)s)")
    p.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=TASK_NAMES, metavar="TASK",
                   help=f"tasks (default: all of {', '.join(TASK_NAMES)})")
    p.add_argument("--n-train", type=int, default=64, help="training prompts per short task (default: %(default)s)")
    p.add_argument("--n-cal", type=int, default=32, help="calibration prompts per short task (default: %(default)s)")
    p.add_argument("--n-val", type=int, default=32, help="validation prompts per short task (default: %(default)s)")
    p.add_argument("--n-long", type=int, default=4, help="prompts of the long task (chain) for each of train, "
                   "calibration and validation: its full-step decode is ~10x a short one's (default: %(default)s)")
    p.add_argument("--risk", type=float, default=0.01, help="allowed share of changed answers (default: %(default)s)")
    p.add_argument("--fit-steps", type=int, default=1500, help="classifier training steps (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="DiffusionGemma only: denoising steps per canvas the "
                   f"rule is recorded and calibrated at (default: {GEMMA_STEPS}, bench gemma's)")
    args = p.parse_args(argv)

    def n_for(task, n):
        return args.n_long if layout_of(task).span_length != LAYOUTS["short"].span_length else n

    for name in ("n_train", "n_cal", "n_val", "n_long", "fit_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive whole number")
    n_cal_total = sum(n_for(t, args.n_cal) for t in args.tasks)
    try:
        check_risk(args.risk, n_cal_total)  # per block length too few keeps threshold 1 there, said in the card
    except ValueError as e:
        p.error(f"--risk: {e} (--n-cal, --n-long)")
    try:
        folder = resolve_text_model(args.model)
        if is_gemma_folder(folder):
            from .models import load_gemma_or_embedded

            model, tok = load_gemma_or_embedded(folder)
        else:
            model, tok = load_text_model_or_embedded(folder)
    except (LoadError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if is_gemma_folder(folder):
        return train_gemma(p, args, argv, model, tok, n_for, prog)
    if args.steps is not None:
        p.error("--steps is DiffusionGemma's (denoising steps per canvas); the masked models decode at the tasks' "
                "own steps: drop it")
    out = args.out or Path(model.config._name_or_path) / FILENAME
    if out.is_dir() or not out.parent.is_dir():
        p.error(f"--out {out}: give a file path in an existing folder")
    work = args.work or out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    digest = weights_digest(model)

    def rec(task, split, seed, n):
        return _cached(work / f"{digest}-{task}-{split}{seed}-n{n}.pt", lambda: _record(model, tok, task, split,
                                                                                         seed, n))

    feats, labels = [], []
    for task in tqdm(args.tasks, desc="recording training runs"):
        for r in rec(task, "train", args.seed, n_for(task, args.n_train)):
            f, y = r.examples()
            feats.append(f)
            labels.append(y)
    with tqdm(total=args.fit_steps, desc="fitting") as bar:
        net, fit_figures = fit(torch.cat(feats), torch.cat(labels), seed=args.seed, steps=args.fit_steps,
                               progress=bar)
    blocks = sorted({decode_setup(model, tok, t)["block_length"] for t in args.tasks})
    commit_model = CommitModel(net, int(model.config.vocab_size), tuple(blocks), digest,
                               (tok.eos_token_id, tok.pad_token_id), {}, {})

    def halt_losses(tasks, split_seed, n_key, thresholds):
        """Per threshold: changed flags, NFE and full NFE over ``tasks``, from recorded full-step runs."""
        changed = [[] for _ in thresholds]
        nfe = [[] for _ in thresholds]
        full = []
        for task in tasks:
            for r in rec(task, "heldout", split_seed, n_for(task, n_key)):
                spans, used = halted_spans(r, net, thresholds)
                ref = _answers(tok, r.final)
                full += [float(decode_setup(model, tok, task)["steps"])] * len(ref)
                for i in range(len(thresholds)):
                    changed[i] += [int(a != b) for a, b in zip(_answers(tok, spans[i]), ref)]
                    nfe[i] += used[i].tolist()
        return changed, nfe, full

    def commit_losses(tasks, split_seed, n_key, threshold):
        changed, nfe, full = [], [], []
        for task in tasks:
            n = n_for(task, n_key)
            ref = [a for r in rec(task, "heldout", split_seed, n) for a in _answers(tok, r.final)]
            answers, used = _cached(work / f"{digest}-s{args.seed}-commit-{task}-heldout{split_seed}-n{n}-"
                                           f"t{threshold}.pt",
                                    lambda: _commit_decode(model, tok, commit_model, task, split_seed, n, threshold))
            changed += [int(a != b) for a, b in zip(answers, ref)]
            nfe += used
            full += [float(decode_setup(model, tok, task)["steps"])] * n
        return changed, nfe, full

    # Each block length gets its own thresholds (a bidirectional model decodes the long task in blocks of 34): a
    # group with too few calibration prompts to certify the risk keeps 1.0, which never clears (full steps).
    thresholds, scans, validation = {"halt": {}, "commit": {}}, {}, {}
    for block in blocks:
        tasks = [t for t in args.tasks if decode_setup(model, tok, t)["block_length"] == block]
        n_cal = sum(n_for(t, args.n_cal) for t in tasks)
        key = str(block)
        if 1 / (n_cal + 1) > args.risk:
            thresholds["halt"][key] = thresholds["commit"][key] = 1.0
            scans[key] = f"{n_cal} calibration prompts cannot certify risk {args.risk}: threshold 1 (full steps)"
            continue
        changed, _, _ = halt_losses(tasks, 1, args.n_cal, HALT_SCAN)
        halt_t, halt_scan = conformal_select(zip(HALT_SCAN, changed), args.risk)
        scan = ((t, commit_losses(tasks, 1, args.n_cal, t)[0])
                for t in tqdm(COMMIT_SCAN, desc=f"calibrating commits (blocks of {block})"))
        commit_t, commit_scan = conformal_select(scan, args.risk)
        thresholds["halt"][key], thresholds["commit"][key] = halt_t or 1.0, commit_t or 1.0
        scans[key] = {"halt": halt_scan, "commit": commit_scan}
        c, nfe, full = halt_losses(tasks, 2, args.n_val, (thresholds["halt"][key],))
        validation[key] = {"tasks": tasks, "halt": _summary(c[0], nfe[0], full),
                           "commit": _summary(*commit_losses(tasks, 2, args.n_val, thresholds["commit"][key]))}
    commit_model.thresholds = thresholds
    shown_args = argv if argv else []
    commit_model.record = {
        "command": " ".join([COMMAND, *shown_args]), "seed": args.seed, "model": str(args.model),
        "data": data_record(args, n_for),
        "risk": args.risk, "fit": fit_figures, "scan": scans,
        "validation": validation, "controls": list(CONTROLS)}
    return write_commit_model(commit_model, out, _card(commit_model), fit_figures, validation)


def _card(m: CommitModel) -> str:
    r = m.record
    lines = ["# Learned commit rule", "",
             "A per-token classifier (diffexit.dllm.commit_rule) that predicts whether a masked token's current "
             "argmax is its final value; made by:", "", f"    {r['command']}", "",
             f"- language model: `{r['model']}`, weights digest `{m.lm_digest}`, vocabulary {m.vocab_size}, "
             f"blocks {list(m.block_lengths)}", f"- seed {r['seed']}; data: {json.dumps(r['data'])}",
             f"- fit: {json.dumps(r['fit'])}",
             f"- thresholds (conformal risk control, risk {r['risk']}): {json.dumps(m.thresholds)}", "",
             "Validation (held-out draw 2) against full steps:", "",
             "| blocks | tasks | mode | n | changed | 95% CI | NFE speedup |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for block, group in r["validation"].items():
        for mode in (m for m in ("commit", "halt") if m in group):
            v = group[mode]
            lines.append(f"| {block} | {', '.join(group['tasks'])} | {mode} | {v['n']} | {v['rate']:.4f} | "
                         f"{v['rate_ci95'][0]:.3f}-{v['rate_ci95'][1]:.3f} | {v['speedup_nfe']:.2f}x |")
    lines += ["", "Block lengths without a row had too few calibration prompts to certify the risk; their "
              "thresholds are 1 (never clears: full steps)."]
    return "\n".join(lines) + "\n"
