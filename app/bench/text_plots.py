"""The plots of ``diffexit bench text``: NFE speedup against accuracy, wall-clock speedup against the share of
answers the same as full steps, and one decoding run's margin against SchED's threshold."""

from __future__ import annotations

from pathlib import Path

from ...common.schedules import ThresholdSchedule
from ...dllm.charlm.tasks import DECODE, layout_of, sample
from ...dllm.charlm.tokenizer import encode_prompts
from ...dllm.generate import generate
from ...dllm.halting import SchED

SUMMARIES = ("discriminating", "controls")
# By row family (app/bench/rows.py): the SchED grid is one family, each other statistic its own.
COLORS = {"sched": "tab:blue", "full": "black", "one-step": "tab:red", "prophet": "tab:orange",
          "parallel": "tab:green", "sched-cosine+parallel": "tab:purple", "sched (min)": "tab:cyan",
          "sched (quantile)": "tab:olive", "sched (median)": "tab:pink", "sched (mean_content)": "tab:brown",
          "sched (max_entropy)": "navy", "sched (min)+parallel": "teal", "sched (quantile)+parallel": "darkolivegreen",
          "oracle-halt": "gold", "oracle-commit": "goldenrod", "learned-commit": "crimson", "learned-halt": "magenta"}
# The commit oracle is no bound: its legend says so wherever it shows.
LABELS = {"oracle-commit": "oracle-commit (reference, not a bound)"}


def _marker(row: dict) -> str:
    return {"prefix": "s", "dual": "D"}.get(row["params"].get("cache"), "o")


def _scatter(ax, row: dict, x: float, y: float) -> None:
    """One row's point: colour by family, shape by cache; a block-causal model's points are hollow and its legend
    entries name the model, so both models share one panel."""
    if x is None:  # a row without wall-clock (the commit oracle) on the wall-clock panel
        return
    family = row["family"]
    color, label = COLORS.get(family, "tab:gray"), LABELS.get(family, family)
    if row.get("block_causal"):
        ax.scatter(x, y, facecolors="none", edgecolors=color, s=22, marker=_marker(row),
                   label=f"{label} [{row['model']}]")
    else:
        ax.scatter(x, y, color=color, s=18, marker=_marker(row), label=label)


def _log_x(ax) -> None:
    """A log x axis labelled 1, 2, 5, 10, ...: the speedups span less than a decade, where matplotlib's default
    labels every minor tick in powers of ten, over one another."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_pareto(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows}, key=lambda t: (t not in SUMMARIES, t))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in rows if r["task"] == task):
            _scatter(ax, r, r["speedup_nfe"], 100 * r["score"])
        ax.set_title(task)
        _log_x(ax)
        ax.set_xlabel("NFE speedup")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    _save(fig, axes, path)


def plot_wall(rows: list[dict], path: Path) -> None:
    """Wall-clock speedup over uncached full steps against the share of answers the same as full steps, per summary
    group and on ``chain``, each model against its own full steps; squares are prefix-cached rows, diamonds
    dual-cached ones, hollow points a block-causal model's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [t for t in (*SUMMARIES, "chain") if any(r["task"] == t for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, task in zip(axes[0], panels):
        for r in (r for r in rows if r["task"] == task and r["baseline"] == "full"):
            _scatter(ax, r, r["speedup_wall"], 100 * r["agreement"])
        ax.set_title(task)
        _log_x(ax)
        ax.set_xlabel("wall-clock speedup")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("answers the same as full steps (%)")
    _save(fig, axes, path)


def _save(fig, axes, path: Path) -> None:
    """Write ``fig`` with one legend (each family once, from the first panel) to its right."""
    import matplotlib.pyplot as plt

    handles, labels = axes[0][0].get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    fig.tight_layout()
    fig.legend(uniq.values(), uniq.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_trace(model, tok, task: str, path: Path) -> None:
    """One held-out run of ``task`` under SchED (cosine): the masked span's mean margin against the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ex = sample(task, "heldout", seed=0, n=1)[0]
    layout = layout_of(task)
    ids, attn = encode_prompts(tok, [ex.prompt], layout.prompt_length)
    block, steps = DECODE[layout.span_length]
    out = generate(model, ids, attention_mask=attn, gen_length=layout.span_length, steps=steps, block_length=block,
                   mask_id=tok.mask_token_id, halting=SchED(ThresholdSchedule("cosine", 7.5, 2.5)), return_trace=True)
    full = generate(model, ids, attention_mask=attn, gen_length=layout.span_length, steps=steps, block_length=block,
                    mask_id=tok.mask_token_id, halting=SchED(ThresholdSchedule("constant", 1e9, 1e9)),
                    return_trace=True)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot([t.step for t in full.trace[0]], [t.margin for t in full.trace[0]], color="gray", label="mean margin (full run)")
    ax.plot([t.step for t in out.trace[0]], [t.margin for t in out.trace[0]], color="tab:blue", label="mean margin (SchED)")
    ax.plot([t.step for t in full.trace[0]], [ThresholdSchedule("cosine", 7.5, 2.5)(t.progress) for t in full.trace[0]],
            color="tab:red", linestyle="--", label="cosine threshold")
    if out.halt_step[0] >= 0:
        ax.axvline(int(out.halt_step[0]), color="tab:blue", alpha=0.4)
    ax.set_xlabel("step")
    ax.set_ylabel("logit margin")
    ax.set_title(f"{task}: halted at step {int(out.halt_step[0])} of {steps}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
