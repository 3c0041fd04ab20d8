"""Every metric on a hand-made record, with the expected values worked out by hand in the comments."""
import numpy as np
import pytest

from cilbench.metrics import (Record, backward_transfer, forgetting_avalanche, forgetting_chaudhry,
                              forgetting_curve, forgetting_pilot, summarize)

NAN = np.nan
# a[t][j] after learning task t, on task j. Task 0 improves after task 1 (90 -> 95), task 1 after task 2.
A = np.array([[90.0, NAN, NAN],
              [95.0, 80.0, NAN],
              [60.0, 85.0, 75.0]])
# images per task 20, 20, 40 -> top-1 hits = a * n / 100
N = np.array([[20, NAN, NAN], [20, 20, NAN], [20, 20, 40]])
C1 = np.array([[18, NAN, NAN], [19, 16, NAN], [12, 17, 30]])
C5 = np.array([[20, NAN, NAN], [20, 19, NAN], [18, 20, 38]])


def test_the_three_forgetting_definitions_and_bwt():
    # PILOT/CaRE: max over all rows incl. the last: task 0 max(90,95,60)-60 = 35, task 1 max(80,85)-85 = 0
    assert forgetting_pilot(A) == pytest.approx((35 + 0) / 2)
    # Chaudhry: earlier rows only: task 0 max(90,95)-60 = 35, task 1 80-85 = -5
    assert forgetting_chaudhry(A) == pytest.approx((35 - 5) / 2)
    # Avalanche: right after learning minus last: task 0 90-60 = 30, task 1 80-85 = -5
    assert forgetting_avalanche(A) == pytest.approx((30 - 5) / 2)
    # BWT (Lopez-Paz): (60-90) and (85-80)
    assert backward_transfer(A) == pytest.approx((-30 + 5) / 2)


def test_pilot_forgetting_is_never_negative_per_task():
    improving = np.array([[50.0, NAN], [70.0, 90.0]])
    assert forgetting_pilot(improving) == 0.0
    assert forgetting_chaudhry(improving) == pytest.approx(-20.0)


def test_summary_from_counts_both_weightings():
    m = summarize(Record.from_counts(N, C1, C5), n_tasks=3)
    assert m["last_acc"] == pytest.approx(59 / 80 * 100)                       # (12+17+30)/(20+20+40)
    assert m["avg_inc_acc"] == pytest.approx((90 + 87.5 + 73.75) / 3)          # A_1 = 35/40
    assert m["last_acc_task_mean"] == pytest.approx((60 + 85 + 75) / 3)
    assert m["avg_inc_acc_task_mean"] == pytest.approx((90 + 87.5 + 220 / 3) / 3)
    assert m["last_top5"] == pytest.approx(76 / 80 * 100)
    assert m["avg_inc_top5"] == pytest.approx((100 + 97.5 + 95) / 3)
    assert m["forgetting_pilot"] == pytest.approx(17.5) and m["bwt"] == pytest.approx(-12.5)
    assert m["n_evaluated"] == 3 and m["tasks_done"] == 3


def test_thinned_evaluation_uses_evaluated_rows_and_says_which_tasks_count():
    n, c1, c5 = N.copy(), C1.copy(), C5.copy()
    n[1], c1[1], c5[1] = NAN, NAN, NAN          # task 1 not evaluated (eval_every = 2)
    m = summarize(Record.from_counts(n, c1, c5), n_tasks=3)
    assert m["avg_inc_acc"] == pytest.approx((90 + 73.75) / 2) and m["n_evaluated"] == 2
    # task 0: max(90, 60) - 60 = 30; task 1 was never evaluated before the last row: not in J
    assert m["forgetting_pilot"] == pytest.approx(30.0)
    assert m["forgetting_chaudhry"] == pytest.approx(30.0)
    assert m["forgetting_avalanche"] == pytest.approx(30.0)


def test_a_task_without_scored_images_is_undefined_and_left_out():
    n, c1, c5 = N.copy(), C1.copy(), C5.copy()
    n[2, 1], c1[2, 1], c5[2, 1] = 0, 0, 0
    rec = Record.from_counts(n, c1, c5)
    assert np.isnan(rec.a[2, 1]) and rec.empty_cells() == [(2, 1)]
    m = summarize(rec, n_tasks=3)
    assert m["last_acc"] == pytest.approx((12 + 30) / 60 * 100)
    assert m["last_acc_task_mean"] == pytest.approx((60 + 75) / 2)
    assert m["forgetting_pilot"] == pytest.approx(35.0)       # only task 0 is in J


def test_old_runs_without_counts_use_their_stored_accuracy():
    m = summarize(Record(a=A, acc=np.array([90.0, 87.5, 73.75]), top5=np.array([100.0, 97.5, 95.0])), 3)
    assert m["avg_inc_acc"] == pytest.approx((90 + 87.5 + 73.75) / 3)
    assert m["forgetting_pilot"] == pytest.approx(17.5)


def test_single_task_has_no_forgetting():
    one = np.array([[50.0]])
    assert all(np.isnan(f(one)) for f in (forgetting_pilot, forgetting_chaudhry, forgetting_avalanche,
                                          backward_transfer))


def test_forgetting_curve_is_pilot_forgetting_of_each_prefix():
    curve = forgetting_curve(A)
    assert np.isnan(curve[0])
    assert curve[1] == pytest.approx(forgetting_pilot(A[:2, :2]))   # max(90, 95) - 95 = 0
    assert curve[1] == 0.0
    assert curve[2] == pytest.approx(17.5)
