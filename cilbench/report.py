"""Plots of one run (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def run_curves(a: np.ndarray, acc_all: np.ndarray, title: str, out: Path) -> None:
    """Accuracy on all seen classes (A_t) and on the first task, vs task; readable up to 300+ tasks."""
    t = np.arange(1, len(acc_all) + 1)
    ok = ~np.isnan(acc_all)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ax = axes[0]
    marker = "o" if ok.sum() <= 30 else None
    ax.plot(t[ok], acc_all[ok], marker=marker, ms=3, lw=1.5, label="all seen classes (A_t)")
    ax.plot(t[ok], a[ok, 0], marker=marker, ms=3, lw=1, alpha=0.7, label="task 1 classes")
    ax.set(xlabel="task", ylabel="top-1 accuracy (%)", ylim=(0, 100), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    im = ax.imshow(a, vmin=0, vmax=100, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set(xlabel="evaluated task j", ylabel="after learning task t", title="accuracy matrix a[t][j]")
    fig.colorbar(im, ax=ax, label="%")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
