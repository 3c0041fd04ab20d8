"""Metrics from the accuracy matrix (all in percent).

Notation: T tasks (0-based t = 0..T-1); a[t][j] = accuracy on the test images of the classes task j
introduced, after learning task t (defined for j <= t; NaN above the diagonal and on rows that were not
evaluated). A_t = accuracy on all seen classes after task t, weighted by test samples (not the mean of
a[t]). With overlapping tasks (recurring classes) the matrix is over the union of labels: a class
counts once, in the column of the task that introduced it, and predictions range over every seen label.

- last accuracy              A_last = A_{T-1}
- average incremental acc.   Ā = (1/|E|) Σ_{t∈E} A_t, E = evaluated tasks (all tasks by default)
- forgetting (PILOT / CaRE)  F = (1/(T-1)) Σ_{j<T-1} ( max_{t∈E, j<=t<T-1} a[t][j] − a[T-1][j] )
                             (the last task is excluded: it cannot have been forgotten yet; a task
                             never evaluated before the end contributes max over an empty set -> skipped)
- backward transfer          BWT = (1/(T-1)) Σ_{j<T-1} ( a[T-1][j] − a[j][j] )  (tasks with a[j][j] known)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Summary:
    tasks_done: int
    n_tasks: int
    last_acc: float
    avg_inc_acc: float
    forgetting: float
    bwt: float
    last_top5: float
    avg_top5: float
    n_evaluated: int

    def as_dict(self) -> dict:
        """JSON-ready: NaN (undefined, e.g. forgetting of a 1-task run) becomes None/null."""
        return {k: (None if v != v else round(v, 4)) if isinstance(v, float) else v
                for k, v in asdict(self).items()}


def forgetting(a: np.ndarray) -> float:
    """PILOT convention: mean over j < T-1 of (best earlier accuracy on j − final accuracy on j)."""
    t_last = a.shape[0] - 1
    if t_last < 1:
        return float("nan")
    drops = []
    for j in range(t_last):
        earlier = a[j:t_last, j]
        earlier = earlier[~np.isnan(earlier)]
        if earlier.size:
            drops.append(earlier.max() - a[t_last, j])
    return float(np.mean(drops)) if drops else float("nan")


def backward_transfer(a: np.ndarray) -> float:
    t_last = a.shape[0] - 1
    if t_last < 1:
        return float("nan")
    diag = np.array([a[j, j] for j in range(t_last)])
    final = a[t_last, :t_last]
    ok = ~np.isnan(diag)
    return float(np.mean(final[ok] - diag[ok])) if ok.any() else float("nan")


def summarize(a: np.ndarray, acc_all: np.ndarray, top5_all: np.ndarray, n_tasks: int) -> Summary:
    """``a``: (t_done, t_done) task matrix; ``acc_all``/``top5_all``: A_t per task (NaN = not evaluated)."""
    done = a.shape[0]
    evaluated = ~np.isnan(acc_all)
    nan = float("nan")
    return Summary(
        tasks_done=done, n_tasks=n_tasks,
        last_acc=float(acc_all[-1]) if done else nan,
        avg_inc_acc=float(np.nanmean(acc_all)) if evaluated.any() else nan,
        forgetting=forgetting(a) if done else nan,
        bwt=backward_transfer(a) if done else nan,
        last_top5=float(top5_all[-1]) if done else nan,
        avg_top5=float(np.nanmean(top5_all)) if evaluated.any() else nan,
        n_evaluated=int(evaluated.sum()))


def forgetting_curve(a: np.ndarray) -> np.ndarray:
    """F_t for every task t (NaN for t = 0 and unevaluated rows): forgetting as if t were the last task.

    F_t = mean_{j<t} ( max_{t'<t, evaluated} a[t'][j] − a[t][j] ), vectorised with a running max.
    """
    n = a.shape[0]
    out = np.full(n, np.nan)
    if n < 2:
        return out
    filled = np.where(np.isnan(a), -np.inf, a)
    best_before = np.maximum.accumulate(filled, axis=0)[:-1]       # row t-1 = best up to t-1
    drops = best_before - a[1:]                                     # row t-1 <-> task t
    valid = np.tril(np.ones((n - 1, n), dtype=bool), k=0)           # j <= t-1, i.e. j < t
    valid &= np.isfinite(drops)
    sums = np.where(valid, drops, 0.0).sum(1)
    counts = valid.sum(1)
    out[1:] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return out
