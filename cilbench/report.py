"""Plots of one run (matplotlib, headless)."""
from __future__ import annotations

import warnings
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


def _save(fig, out_base: Path) -> list[Path]:
    """PNG and SVG next to each other, written atomically."""
    out_base.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        path = out_base.with_suffix(f".{ext}")
        tmp = path.with_name(f".{path.name}.tmp.{ext}")
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        tmp.replace(path)
        paths.append(path)
    plt.close(fig)
    return paths


def _curve_axes(title: str, ylabel: str, n_tasks: int):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.set(xlabel="task", ylabel=ylabel, title=title, xlim=(0.5, n_tasks + 0.5))
    ax.grid(alpha=0.3)
    return fig, ax


def method_colors(methods) -> dict[str, tuple]:
    """One colour per method name, stable across every plot of a comparison."""
    names = sorted(set(methods))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {m: cmap(i % cmap.N) for i, m in enumerate(names)}


def method_curves(curves: dict[str, list[np.ndarray]], title: str, ylabel: str, out_base: Path,
                  ylim: tuple[float, float] | None = (0, 100), colors: dict | None = None) -> list[Path]:
    """Mean curve per method with a ±1 std band over seeds; markers only for short sequences."""
    n_tasks = max(len(c) for cs in curves.values() for c in cs)
    fig, ax = _curve_axes(title, ylabel, n_tasks)
    colors = colors or method_colors(curves)
    for method, cs in sorted(curves.items()):
        stack = np.full((len(cs), n_tasks), np.nan)
        for k, c in enumerate(cs):
            stack[k, : len(c)] = c
        with warnings.catch_warnings():  # all-NaN columns (unevaluated tasks) are expected
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, std = np.nanmean(stack, 0), np.nanstd(stack, 0)
        ok = ~np.isnan(mean)
        x = np.arange(1, n_tasks + 1)[ok]
        single_point = ok.sum() == 1
        ax.plot(x, mean[ok], color=colors[method], lw=1.6, label=f"{method} (n={len(cs)})",
                marker="o" if n_tasks <= 30 or single_point else None, ms=3 if not single_point else 7)
        if len(cs) > 1:
            ax.fill_between(x, (mean - std)[ok], (mean + std)[ok], color=colors[method], alpha=0.2, lw=0)
    if ylim:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _save(fig, out_base)


def heatmap(a: np.ndarray, title: str, out_base: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(a, vmin=0, vmax=100, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set(xlabel="evaluated task j", ylabel="after learning task t", title=title)
    fig.colorbar(im, ax=ax, label="top-1 accuracy (%)")
    return _save(fig, out_base)


def cost_vs_accuracy(rows: list[dict], title: str, out_base: Path, colors: dict | None = None) -> list[Path]:
    """Last accuracy against memory (added parameters + stored numbers such as prototypes) and
    against total evaluation time; one point per method."""
    colors = colors or method_colors(r["method"] for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        r["extra_numbers"] = r["added_params"] + r["stored_numbers"]
    for ax, key, label in ((axes[0], "extra_numbers", "added parameters + stored numbers"),
                           (axes[1], "eval_s", "total eval time (s)")):
        for r in rows:
            x = max(r[key], 1e-2)  # log axis: a method that adds nothing sits at the left edge
            ax.scatter(x, r["last_acc"], s=30, color=colors[r["method"]])
            ax.annotate(r["method"], (x, r["last_acc"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set(xlabel=f"{label} (log)", ylabel="last accuracy (%)", ylim=(0, 100))
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out_base)
