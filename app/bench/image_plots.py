"""The plots of ``diffexit bench images``: Pareto fronts, sample grids and exit-depth heatmaps (PNG files)."""

from __future__ import annotations

from pathlib import Path

import torch


def plot_pareto(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"full": "black", "base": "tab:gray", "static": "tab:orange", "steps": "tab:green", "fbc": "tab:red",
              "taylorseer": "tab:brown", "magcache": "tab:pink", "composed": "crimson"}
    # The other families (DeeDiff per target and kind, similarity exits) take tab20's colours in order of appearance.
    spare = iter(plt.get_cmap("tab20").colors)
    for family in dict.fromkeys(r["family"] for r in rows):
        if family not in colors:
            colors[family] = next(spare, "tab:gray")
    panels = [("layer_ratio", "psnr", "cost (blocks run / full depth at full steps)"),
              ("layer_ratio", "class_agreement", "cost (blocks run / full depth at full steps)"),
              ("speedup_wall_b1", "class_agreement", "wall-clock speedup, batch 1")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (x, y, xlabel) in zip(axes, panels):
        for family, color in colors.items():
            pts = [(r[x], r[y]) for r in rows if r["family"] == family and r[x] is not None and r[y] is not None]
            if pts:
                pts.sort()
                scale = 100.0 if y == "class_agreement" else 1.0
                style = {"full": "*", "base": "D", "composed": "P"}.get(family, "o-")
                ax.plot([p[0] for p in pts], [scale * p[1] for p in pts], style, color=color, label=family,
                        markersize={"full": 9, "composed": 7}.get(family, 5), linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("class agreement (%)" if y == "class_agreement" else "PSNR vs the shipped model (dB)")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _grid(images: torch.Tensor, per_class: int, shown: int) -> torch.Tensor:
    """``[shown * S, 10 * S]``: row ``i`` holds sample ``i`` of every digit (labels cycle 0..9)."""
    size = images.shape[-1]
    picked = images[: 10 * min(per_class, shown), 0]
    rows = picked.reshape(-1, 10, size, size)
    return rows.permute(0, 2, 1, 3).reshape(rows.shape[0] * size, 10 * size)


def plot_samples(panels: list[tuple[str, torch.Tensor]], per_class: int, path: Path, shown: int = 4) -> None:
    """One grid per method (``shown`` samples of every digit), full depth first, five grids to a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(5, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.8 * cols, (0.9 + 0.3 * min(per_class, shown)) * nrows),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, images) in zip(axes.flat, panels):
        ax.imshow(_grid(images, per_class, shown).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_exit_depths(panels: list[tuple[str, torch.Tensor, torch.Tensor]], path: Path) -> None:
    """Per method, the share of samples that ran ``d = 0..L`` blocks at each sampling step (``[steps, L + 1]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.3 * cols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, counts, timesteps) in zip(axes.flat, panels):
        share = counts.float() / counts.sum(1, keepdim=True).clamp(min=1)
        steps, depths = share.shape
        ax.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="upper",
                  extent=(-0.5, depths - 0.5, steps - 0.5, -0.5))
        ticks = sorted({0, steps // 2, steps - 1})
        ax.set_yticks(ticks, [f"{int(timesteps[t])}" for t in ticks])
        ax.set_xlabel("blocks run")
        ax.set_ylabel("timestep (sampling runs down)")
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
