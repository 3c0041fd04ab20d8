"""Metrics, all derived from the stored accuracy matrix and its per-cell sample counts (percent).

Notation: T tasks evaluated so far (rows t = 0..T-1, the last row is t = T-1); column j = the test
images of the classes task j introduced. For every cell the run stores n[t][j] (images scored),
c1[t][j] and c5[t][j] (top-1 / top-5 hits), so a[t][j] = 100·c1[t][j]/n[t][j]. A cell is NaN above the
diagonal, on rows that were not evaluated (``eval_every`` > 1) and where n = 0 (a task with no
scored images: undefined, excluded from every mean, with a warning). With overlapping tasks a class
counts once, in the column of the task that introduced it.

Accuracy after task t, two weightings (E = evaluated rows; both include task 0):
- ``A_t`` (PILOT, the papers' tables; Avalanche ``Accuracy_On_Trained_Experiences``): sample-weighted,
  A_t = 100·Σ_j c1[t][j] / Σ_j n[t][j]. ``last_acc`` = A_{T-1}; ``avg_inc_acc`` Ā = mean_{t∈E} A_t.
- task-mean (Mammoth ``accmean_task``): A'_t = mean_j a[t][j]; ``last_acc_task_mean``,
  ``avg_inc_acc_task_mean``. The top-5 versions (``last_top5``, ``avg_inc_top5``) are sample-weighted.

Forgetting, three definitions in use, each under its own name. J = the tasks j < T-1 whose last cell
a[T-1][j] is defined and that were evaluated at least once before the last row; each is the mean over J
(|J| = T-1 when every task is evaluated), the last task always excluded:
- ``forgetting_pilot`` (PILOT ``trainer.py`` / CaRE / Mammoth ``utils/metrics.py:forgetting``; the
  headline, as the published tables use it): max_{t∈E, j≤t≤T-1} a[t][j] − a[T-1][j]. The max runs
  over every row *including the last*, so each term is ≥ 0.
- ``forgetting_chaudhry`` (Chaudhry et al. 2018, eq. 3): max_{t∈E, j≤t<T-1} a[t][j] − a[T-1][j], the max
  over earlier rows only; a term is negative where the task improved. (cilbench ≤ 0.1 reported this
  value as PILOT's.)
- ``forgetting_avalanche`` (Avalanche ``StreamForgetting``): a[j][j] − a[T-1][j], accuracy right after
  learning the task minus the last; over the j of J whose row j was evaluated.
- ``bwt`` (Lopez-Paz & Ranzato 2017; Mammoth ``backward_transfer``): a[T-1][j] − a[j][j] over the same
  tasks as ``forgetting_avalanche`` (= its negative).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

# name -> one-line definition, written into every summary.json so a number travels with its meaning
DEFINITIONS = {
    "last_acc": "A_{T-1}: top-1 over all test images of the seen classes after the last task (sample-weighted, PILOT)",
    "avg_inc_acc": "mean over evaluated tasks t of A_t (sample-weighted; PILOT/CaRE 'average incremental accuracy')",
    "last_acc_task_mean": "mean over tasks j of a[T-1][j] (Mammoth 'accmean')",
    "avg_inc_acc_task_mean": "mean over evaluated t of mean_j a[t][j] (Mammoth)",
    "forgetting_pilot": "mean_{j<T-1} max_{t<=T-1} a[t][j] - a[T-1][j], max over all rows incl. the last "
                        "(PILOT/CaRE/Mammoth; >= 0 per task)",
    "forgetting_chaudhry": "mean_{j<T-1} max_{t<T-1} a[t][j] - a[T-1][j], max over earlier rows only "
                           "(Chaudhry et al. 2018; a term can be negative)",
    "forgetting_avalanche": "mean_{j<T-1} a[j][j] - a[T-1][j] (Avalanche StreamForgetting)",
    "bwt": "mean_{j<T-1} a[T-1][j] - a[j][j] (Lopez-Paz & Ranzato 2017; Mammoth)",
    "last_top5": "top-5 over all seen-class test images after the last task (sample-weighted)",
    "avg_inc_top5": "mean over evaluated tasks of the sample-weighted top-5",
}
HEADLINE_FORGETTING = "forgetting_pilot"


@dataclass(frozen=True)
class Record:
    """The stored evaluation of a run: hits and counts per cell (NaN = row not evaluated / above the
    diagonal). Runs written before counts were kept give ``a`` and the stored A_t instead."""

    a: np.ndarray                          # (T, T) top-1 accuracy per cell, percent
    n: np.ndarray | None = None            # (T, T) images scored per cell
    c1: np.ndarray | None = None           # (T, T) top-1 hits
    c5: np.ndarray | None = None           # (T, T) top-5 hits
    acc: np.ndarray | None = None          # (T,) stored A_t of runs without counts
    top5: np.ndarray | None = None         # (T,) stored top-5 of runs without counts

    @classmethod
    def from_counts(cls, n: np.ndarray, c1: np.ndarray, c5: np.ndarray) -> "Record":
        n, c1, c5 = (np.asarray(x, dtype=float) for x in (n, c1, c5))
        return cls(a=percent(c1, n), n=n, c1=c1, c5=c5)

    @property
    def evaluated(self) -> np.ndarray:
        """Rows that were evaluated."""
        if self.n is not None:
            return ~np.isnan(self.n).all(1)
        return ~np.isnan(self.acc) if self.acc is not None else ~np.isnan(self.a).all(1)

    def seen_accuracy(self, top5: bool = False) -> np.ndarray:
        """A_t per row (sample-weighted over all seen classes), NaN for rows not evaluated."""
        if self.n is None:
            stored = self.top5 if top5 else self.acc
            return np.asarray(stored, dtype=float) if stored is not None else np.full(len(self.a), np.nan)
        hits = self.c5 if top5 else self.c1
        total = np.nansum(self.n, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = 100.0 * np.nansum(hits, 1) / total
        return np.where(self.evaluated & (total > 0), out, np.nan)

    def task_mean_accuracy(self) -> np.ndarray:
        """A'_t = mean_j a[t][j] over the defined cells of row t (Mammoth's weighting)."""
        return _nanmean_rows(self.a)

    def empty_cells(self) -> list[tuple[int, int]]:
        """(t, j) of evaluated cells with no scored image (undefined accuracy)."""
        if self.n is None:
            return []
        rows, cols = np.nonzero(self.n == 0)
        return list(zip(rows.tolist(), cols.tolist()))


def percent(hits: np.ndarray, n: np.ndarray) -> np.ndarray:
    """100·hits/n per cell; NaN where nothing was scored (n = 0) or not evaluated (n = NaN)."""
    hits, n = np.asarray(hits, dtype=float), np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, 100.0 * hits / np.where(n > 0, n, 1), np.nan)


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, 1) if x.size else np.zeros(0)


def _mean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def _forgetting_terms(a: np.ndarray, include_last_row: bool) -> np.ndarray:
    """max_t a[t][j] − a[T-1][j] for j in J (see the module docstring), NaN elsewhere."""
    t_last = a.shape[0] - 1
    if t_last < 1:
        return np.zeros(0)
    before = a[:t_last, :t_last]
    seen_before = ~np.isnan(before).all(0)
    final = a[t_last, :t_last]
    rows = a[:, :t_last] if include_last_row else before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        best = np.nanmax(rows, 0)
    return np.where(seen_before & ~np.isnan(final), best - final, np.nan)


def forgetting_pilot(a: np.ndarray) -> float:
    """PILOT/CaRE/Mammoth: max over all rows including the last; every term ≥ 0."""
    return _mean(_forgetting_terms(a, include_last_row=True))


def forgetting_chaudhry(a: np.ndarray) -> float:
    """Chaudhry et al. 2018: max over earlier rows only; a term is negative where the task improved."""
    return _mean(_forgetting_terms(a, include_last_row=False))


def _diagonal_terms(a: np.ndarray) -> np.ndarray:
    """a[T-1][j] − a[j][j] for j < T-1 (NaN where either is undefined)."""
    t_last = a.shape[0] - 1
    if t_last < 1:
        return np.zeros(0)
    return a[t_last, :t_last] - np.diagonal(a)[:t_last]


def forgetting_avalanche(a: np.ndarray) -> float:
    """Avalanche: accuracy right after learning the task minus the last."""
    return -_mean(_diagonal_terms(a)) if a.shape[0] > 1 else float("nan")


def backward_transfer(a: np.ndarray) -> float:
    """Lopez-Paz & Ranzato (2017)."""
    return _mean(_diagonal_terms(a)) if a.shape[0] > 1 else float("nan")


def summarize(record: Record, n_tasks: int) -> dict:
    """Every metric of the module docstring, keyed by its name (NaN = undefined)."""
    a, done = record.a, record.a.shape[0]
    nan = float("nan")
    acc, top5, task_mean = record.seen_accuracy(), record.seen_accuracy(top5=True), record.task_mean_accuracy()
    last = lambda x: float(x[-1]) if done else nan  # noqa: E731
    return {
        "tasks_done": done, "n_tasks": n_tasks, "n_evaluated": int(record.evaluated.sum()),
        "last_acc": last(acc), "avg_inc_acc": _mean(acc),
        "last_acc_task_mean": last(task_mean), "avg_inc_acc_task_mean": _mean(task_mean),
        "forgetting_pilot": forgetting_pilot(a), "forgetting_chaudhry": forgetting_chaudhry(a),
        "forgetting_avalanche": forgetting_avalanche(a), "bwt": backward_transfer(a),
        "last_top5": last(top5), "avg_inc_top5": _mean(top5),
    }


def as_json(metrics: dict) -> dict:
    """JSON-ready: NaN (undefined, e.g. forgetting of a 1-task run) becomes null; floats to 4 decimals."""
    return {k: (None if v != v else round(v, 4)) if isinstance(v, float) else v for k, v in metrics.items()}


def forgetting_curve(a: np.ndarray) -> np.ndarray:
    """F_t (``forgetting_pilot`` as if t were the last task) for every task; NaN for t = 0 and
    unevaluated rows. Vectorised with running maxima over the rows."""
    n = a.shape[0]
    out = np.full(n, np.nan)
    if n < 2:
        return out
    filled = np.where(np.isnan(a), -np.inf, a)
    best_upto = np.maximum.accumulate(filled, axis=0)[1:]          # row t-1 <-> best over rows 0..t
    seen_before = np.maximum.accumulate(~np.isnan(a), axis=0)[:-1]  # evaluated at some row < t
    drops = best_upto - a[1:]
    valid = np.tril(np.ones((n - 1, n), dtype=bool), k=0) & seen_before & np.isfinite(drops)
    sums = np.where(valid, drops, 0.0).sum(1)
    counts = valid.sum(1)
    out[1:] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return out
