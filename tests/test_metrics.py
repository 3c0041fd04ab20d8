import numpy as np
import pytest

from cilbench.metrics import backward_transfer, forgetting, summarize

NAN = np.nan
# a[t][j] after learning task t on task j (3 tasks)
A = np.array([[90.0, NAN, NAN],
              [70.0, 80.0, NAN],
              [60.0, 85.0, 75.0]])
A_ALL = np.array([90.0, 75.0, 73.0])  # sample-weighted, given separately
TOP5 = np.array([99.0, 95.0, 93.0])


def test_forgetting_excludes_last_task():
    # task 0: max(90, 70) - 60 = 30 ; task 1: max(80) - 85 = -5 ; task 2 excluded
    assert forgetting(A) == pytest.approx((30 + (-5)) / 2)


def test_backward_transfer():
    # (60 - 90) and (85 - 80)
    assert backward_transfer(A) == pytest.approx((-30 + 5) / 2)


def test_summary():
    s = summarize(A, A_ALL, TOP5, n_tasks=3)
    assert s.last_acc == 73.0
    assert s.avg_inc_acc == pytest.approx((90 + 75 + 73) / 3)
    assert s.last_top5 == 93.0
    assert s.avg_top5 == pytest.approx((99 + 95 + 93) / 3)
    assert s.n_evaluated == 3 and s.tasks_done == 3


def test_thinned_evaluation_averages_evaluated_rows_only():
    a = A.copy()
    a[1] = NAN  # task 1 not evaluated
    acc = np.array([90.0, NAN, 73.0])
    s = summarize(a, acc, np.array([99.0, NAN, 93.0]), n_tasks=3)
    assert s.avg_inc_acc == pytest.approx((90 + 73) / 2)
    assert s.n_evaluated == 2
    # task 0: max(90) - 60 ; task 1: never evaluated before the end -> skipped
    assert s.forgetting == pytest.approx(30.0)


def test_single_task_has_no_forgetting():
    assert np.isnan(forgetting(np.array([[50.0]])))
