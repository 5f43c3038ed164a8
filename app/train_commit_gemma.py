"""``diffexit train commit --model gemma``: the learned rule as a DiffusionGemma stopping criterion
(:mod:`diffexit.dllm.gemma_commit`), trained, calibrated and validated as ``diffexit train commit`` does the masked
models' (:mod:`diffexit.app.train_commit`), in halting mode only (uniform diffusion has no masks to commit).

1. Records all-steps decodes (``--steps`` per canvas, each example's noise seeded by its index, as ``bench gemma``
   does) of TRAINING prompts of the tasks, every step's features of every canvas token, label: the token's argmax
   is the one its canvas ends with.
2. Fits the classifier (seeded).
3. Calibrates the halting threshold with conformal risk control (risk = share of answers changed against all steps)
   on held-out draw 1, from the recorded runs (:func:`diffexit.dllm.gemma_commit.halted`), per task: the threshold
   is the most conservative of the tasks', so that each task's risk is bounded (the bench averages over tasks).
4. Validates by decoding held-out draw 2 with the rule at that threshold, against all steps.

Resumable as the masked trainer is: each recording and validation decode is kept in ``--work``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..dllm.calibrate import check_risk, conformal_select
from ..dllm.charlm.gemma import gemma_decode, gemma_span
from ..dllm.charlm.tasks import CONTROLS, layout_of, sample
from ..dllm.charlm.tokenizer import decode_answer, encode_prompts
from ..dllm.commit_rule import FILENAME, CommitModel, weights_digest
from ..dllm.commit_training import HALT_SCAN, cached, fit, summary
from ..dllm.gemma_commit import GEMMA_FEATURES, MODE, LearnedStopping, halted, record, text_vocab
from .commit_files import data_record, write_commit_model

BATCH = 64  # bench gemma's
GEMMA_STEPS = 16  # bench gemma's denoising steps per canvas


def is_gemma_folder(folder) -> bool:
    """Whether ``folder`` holds a DiffusionGemma model (its config's ``model_type``)."""
    config = Path(folder) / "config.json" if folder is not None else None
    if config is None or not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "diffusion_gemma"
    except (OSError, ValueError):
        return False


def _record(model, tok, task, split, draw, n, steps):
    """All-steps recordings of ``n`` prompts of ``task`` (one per batch of ``BATCH``); example ``i`` seeded ``i``."""
    layout = layout_of(task)
    examples = sample(task, split, seed=draw, n=n)
    out = []
    for i in range(0, n, BATCH):
        ids, mask = encode_prompts(tok, [e.prompt for e in examples[i:i + BATCH]], layout.prompt_length)
        out.append(record(model, ids, mask, seeds=range(i, i + len(ids)), steps=steps,
                          max_new_tokens=gemma_span(layout, model.config.canvas_length),
                          eos_token_ids=(tok.eos_token_id, tok.pad_token_id)))
    return out


def _decode(model, tok, commit_model, task, draw, n, steps, threshold):
    """``(answers, passes)`` of held-out draw ``draw`` decoded with the rule, seeded as :func:`_record`."""
    examples = sample(task, "heldout", seed=draw, n=n)
    answers, passes = [], []
    for i in range(0, n, BATCH):
        texts, used = gemma_decode(model, tok, [e.prompt for e in examples[i:i + BATCH]], layout_of(task), steps,
                                   seed=i, stopping=LearnedStopping(commit_model, threshold))
        answers += texts
        passes += used.float().tolist()
    return answers, passes


def train_gemma(p, args, argv, model, tok, n_for, command: str) -> int:
    """The DiffusionGemma branch of :func:`diffexit.app.train_commit.main` (its parser ``p``, parsed ``args``,
    ``argv``, ``n_for(task, n)`` (the prompts of a task) and ``command``, its name, for the card)."""
    steps = GEMMA_STEPS if args.steps is None else args.steps
    if steps < 1:
        p.error("--steps must be a positive whole number")
    for task in args.tasks:  # the risk is certified per task here
        try:
            check_risk(args.risk, n_for(task, args.n_cal))
        except ValueError as e:
            p.error(f"--risk: {e} (--n-cal, --n-long: DiffusionGemma calibrates each task on its own prompts)")
    out = args.out or Path(model.config._name_or_path) / FILENAME
    if out.is_dir() or not out.parent.is_dir():
        p.error(f"--out {out}: give a file path in an existing folder")
    work = args.work or out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    digest = weights_digest(model)
    length = int(model.config.canvas_length)
    # Recordings hold features: a file made with another feature set must not be read back.
    features = hashlib.sha256(" ".join(GEMMA_FEATURES).encode()).hexdigest()[:8]

    def rec(task, split, draw, n):
        return cached(work / f"{digest}-gemma-{features}-s{steps}-{task}-{split}{draw}-n{n}.pt",
                       lambda: _record(model, tok, task, split, draw, n, steps))

    def answers(recordings):
        return [decode_answer(tok, row) for r in recordings for row in r.generated]

    feats, labels = [], []
    for task in tqdm(args.tasks, desc="recording training runs"):
        for r in rec(task, "train", args.seed, n_for(task, args.n_train)):
            f, y = r.examples()
            feats.append(f)
            labels.append(y)
    with tqdm(total=args.fit_steps, desc="fitting") as bar:
        net, fit_figures = fit(torch.cat(feats), torch.cat(labels), seed=args.seed, steps=args.fit_steps,
                               progress=bar)
    commit_model = CommitModel(net, text_vocab(model), (length,), digest, (tok.eos_token_id, tok.pad_token_id),
                               {}, {}, GEMMA_FEATURES)

    # Calibration, per task (the bench averages agreement over tasks, so one task must not spend the others'
    # share): per threshold of the scan, whether each held-out prompt's answer changed, from the recordings. The
    # threshold is the most conservative of the tasks' certified ones; none certified: 1, never stop.
    chosen, scan = [], {}
    for task in args.tasks:
        changed = [[] for _ in HALT_SCAN]
        for r in rec(task, "heldout", 1, n_for(task, args.n_cal)):
            flags, _ = halted(r, net, HALT_SCAN)
            for i in range(len(HALT_SCAN)):
                changed[i] += flags[i].int().tolist()
        t, scan[task] = conformal_select(zip(HALT_SCAN, changed), args.risk)
        chosen.append(1.0 if t is None else t)
    threshold = max(chosen)

    # Validation: decode held-out draw 2 with the rule, against its all-steps decode.
    per_task, all_changed, all_passes, all_full = {}, [], [], []
    for task in tqdm(args.tasks, desc="validating"):
        n = n_for(task, args.n_val)
        ref = answers(rec(task, "heldout", 2, n))
        got, used = cached(work / f"{digest}-gemma-{features}-s{steps}-seed{args.seed}-{task}-heldout2-n{n}-"
                                   f"t{threshold}.pt",
                            lambda: _decode(model, tok, commit_model, task, 2, n, steps, threshold))
        flags = [int(a != b) for a, b in zip(got, ref)]
        # All steps' passes: every canvas a sample decodes until it ends (EOS), as the recording ran them.
        full = [float(steps * sum(int((rows == j).any()) for rows, _, _ in r.canvases))
                for r in rec(task, "heldout", 2, n) for j in range(r.batch)]
        per_task[task] = {**summary(flags, used, full), "passes": sum(used) / n, "full_passes": sum(full) / n}
        all_changed += flags
        all_passes += used
        all_full += full
    validation = {str(length): {"tasks": list(args.tasks), MODE: summary(all_changed, all_passes, all_full),
                                "per_task": per_task}}
    commit_model.thresholds = {MODE: {str(length): threshold}}
    commit_model.record = {
        "command": " ".join([command, *argv]), "seed": args.seed, "model": str(args.model),
        "denoising_steps": steps,
        "data": data_record(args, n_for),
        "risk": args.risk, "fit": fit_figures, "scan": {str(length): {MODE: scan}}, "validation": validation,
        "controls": list(CONTROLS)}
    return write_commit_model(commit_model, out, _card(commit_model), fit_figures, validation)


def _card(m: CommitModel) -> str:
    r = m.record
    (length, group), = r["validation"].items()
    lines = ["# Learned stopping rule (DiffusionGemma)", "",
             "A per-token classifier (diffexit.dllm.gemma_commit.LearnedStopping) that predicts whether a canvas "
             "token's current argmax is the one the canvas ends with after every denoising step; a sample stops "
             "when every token of its canvas clears the threshold. Halting only: uniform-corruption diffusion has no "
             "masks, so there is no commit mode. Made by:", "", f"    {r['command']}", "",
             f"- language model: `{r['model']}`, weights digest `{m.lm_digest}`, vocabulary {m.vocab_size}, "
             f"canvas {length} tokens, {r['denoising_steps']} denoising steps per canvas",
             f"- features: {', '.join(m.features)}",
             f"- seed {r['seed']}; data: {json.dumps(r['data'])}", f"- fit: {json.dumps(r['fit'])}",
             f"- halting threshold (conformal risk control, risk {r['risk']} on each task's calibration prompts, the most "
             f"conservative of the tasks'): {m.thresholds[MODE][length]}", "",
             "Validation (held-out draw 2), decoded with the rule against all steps:", "",
             "| task | n | changed | 95% CI | passes | all steps | fewer passes |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for task, v in group["per_task"].items():
        lines.append(f"| {task} | {v['n']} | {v['changed']} | {v['rate_ci95'][0]:.3f}-{v['rate_ci95'][1]:.3f} | "
                     f"{v['passes']:.2f} | {v['full_passes']:.2f} | {v['speedup_nfe']:.2f}x |")
    v = group[MODE]
    lines.append(f"| all | {v['n']} | {v['changed']} | {v['rate_ci95'][0]:.3f}-{v['rate_ci95'][1]:.3f} | | | "
                 f"{v['speedup_nfe']:.2f}x |")
    return "\n".join(lines) + "\n"
