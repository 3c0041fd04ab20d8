"""Leaderboards from run folders built out of known accuracy matrices (numbers checked by hand)."""

import numpy as np
import pandas as pd
import pytest

from cilbench.cli import main
from cilbench.compare import find_runs, leaderboard, load_run, write_comparison
from cilbench.evaluator import EvalState
from cilbench.metrics import forgetting_curve
from cilbench.results import RunDir

NAN = np.nan


def make_run(root, bench, method, seed, a, acc_all, n_tasks=None, learn=1.0, eval_=0.5, added=100, trainable=10):
    """Write a run folder the way the evaluator does (events.jsonl + summary.json)."""
    n_done = len(acc_all)
    n_tasks = n_tasks or n_done
    rd = RunDir(root / f"{bench}__{method}__s{seed}")
    rd.path.mkdir(parents=True)
    state = EvalState(n_tasks)
    cost = {"total": 1000 + added, "trainable": trainable, "added": added, "stored": 7}
    for t in range(n_done):
        state.a[t, : t + 1] = a[t][: t + 1]
        state.acc_all[t] = acc_all[t]
        state.top5_all[t] = min(100.0, acc_all[t] + 10) if not np.isnan(acc_all[t]) else NAN
        evaluated = not np.isnan(acc_all[t])
        rd.append_event({"task": t, "learn_s": learn, "eval_s": eval_ if evaluated else 0.0,
                         "acc": acc_all[t] if evaluated else None,
                         "per_task": list(a[t][: t + 1]) if evaluated else None,
                         "peak_mem_mb": 50.0 + seed, "cost": cost})
    state.tasks_done = n_done
    rd.write_summary({"status": "finished" if n_done == n_tasks else "running", "benchmark": bench,
                      "method": method, "seed": seed, "metrics": state.summary().as_dict(), "cost": cost,
                      "learn_s_total": learn * n_done, "eval_s_total": eval_ * n_done,
                      "peak_mem_mb": 50.0 + seed})
    return rd.path


A1 = [[90, NAN, NAN], [70, 80, NAN], [60, 85, 75]]      # F = (30 + -5)/2 = 12.5 ; BWT = (-30 + 5)/2 = -12.5
A2 = [[80, NAN, NAN], [60, 90, NAN], [50, 70, 80]]      # F = (30 + 20)/2 = 25   ; BWT = (-30 - 20)/2 = -25


@pytest.fixture
def results(tmp_path):
    make_run(tmp_path, "b3", "alpha", 1, A1, [90.0, 75.0, 73.0])
    make_run(tmp_path, "b3", "alpha", 2, A2, [80.0, 75.0, 67.0])
    make_run(tmp_path, "b3", "beta", 1, A1, [90.0, 80.0, 80.0], added=0, trainable=0)
    make_run(tmp_path, "b3", "alpha", 3, [[99.0]], [99.0], n_tasks=3)   # crashed after task 1
    return tmp_path


def test_seed_aggregation_and_every_number(results):
    runs = [load_run(p) for p in find_runs([results])]
    assert len(runs) == 4
    board = leaderboard(runs)
    alpha = board[(board.method == "alpha") & (board.status == "complete")].iloc[0]
    assert alpha.seeds == "1,2" and alpha.n_seeds == 2
    assert alpha.last_acc == pytest.approx(70.0)
    assert alpha.last_acc_std == pytest.approx(np.std([73.0, 67.0], ddof=1))
    assert alpha.avg_inc_acc == pytest.approx(np.mean([(90 + 75 + 73) / 3, (80 + 75 + 67) / 3]))
    assert alpha.forgetting == pytest.approx((12.5 + 25) / 2)
    assert alpha.forgetting_std == pytest.approx(np.std([12.5, 25], ddof=1))
    assert alpha.bwt == pytest.approx((-12.5 - 25) / 2)
    assert alpha.added_params == 100 and alpha.trainable_params == 10
    assert alpha.train_s == pytest.approx(3.0) and alpha.eval_s == pytest.approx(1.5)
    assert alpha.peak_mem_mb == pytest.approx(51.5)
    beta = board[board.method == "beta"].iloc[0]
    assert beta.last_acc == 80.0 and np.isnan(beta.last_acc_std)


def test_incomplete_runs_are_listed_apart_and_never_averaged(results):
    board = leaderboard([load_run(p) for p in find_runs([results])])
    assert list(board.status) == ["complete", "complete", "incomplete (1/3)"]
    assert list(board.method) == ["beta", "alpha", "alpha"]          # complete rows sorted by last acc
    inc = board.iloc[2]
    assert inc.seeds == "3" and inc.last_acc == 99.0
    complete_alpha = board.iloc[1]
    assert complete_alpha.last_acc == pytest.approx(70.0)             # 99 did not leak into the mean


def test_written_files_and_published_rows(results, tmp_path):
    out = tmp_path / "cmp"
    runs = [load_run(p) for p in find_runs([results])]
    table, files = write_comparison(runs, out, with_published=False)
    csv = pd.read_csv(out / "leaderboard.csv")
    assert {"method", "benchmark", "seeds", "avg_inc_acc", "last_acc", "forgetting", "bwt",
            "trainable_params", "added_params", "train_s", "eval_s", "peak_mem_mb"} <= set(csv.columns)
    md = (out / "leaderboard.md").read_text()
    assert "70.00 ± 4.24" in md and "incomplete (1/3)" in md
    for name in ("b3_accuracy", "b3_forgetting", "b3_cost", "heatmaps/b3__alpha__s1"):
        assert (out / "plots" / f"{name}.png").exists() and (out / "plots" / f"{name}.svg").exists()
    # published numbers ride along only when asked, labelled as such
    make_run(results, "ob1k-301", "gamma", 1, [[50.0]], [50.0])
    runs = [load_run(p) for p in find_runs([results])]
    table, _ = write_comparison(runs, out, with_published=True)
    pub = table[table.method == "care (published)"]
    assert len(pub) == 1 and pub.iloc[0]["last acc"] == "68.51" and "CaRE" in pub.iloc[0]["status"]
    assert not (table.method == "care (published)").any() or (table.benchmark == "ob1k-301").any()


def test_forgetting_curve_matches_the_definition():
    a = np.array(A1, dtype=float)
    f = forgetting_curve(a)
    assert np.isnan(f[0])
    assert f[1] == pytest.approx(90 - 70)
    assert f[2] == pytest.approx(((90 - 60) + (80 - 85)) / 2)


def test_cli_compare_and_show(results, tmp_path, capsys):
    assert main(["compare", "--results", str(results), "--out", str(tmp_path / "o"), "--bench", "b3"]) == 0
    assert main(["show", str(results / "b3__beta__s1")]) == 0
    out = capsys.readouterr().out
    assert "leaderboard" in out and "beta" in out and "incomplete" in out
    assert main(["compare", str(tmp_path / "nothing-here")]) == 2


def test_runs_with_different_settings_are_separate_rows(tmp_path):
    """Two variants of one method: the seeds of each are aggregated, the variants never mixed."""
    for seed, a, acc in ((1, A1, [90.0, 75.0, 73.0]), (2, A2, [80.0, 75.0, 67.0])):
        for stats in ("covariance", "lowrank"):
            path = make_run(tmp_path / stats, "b3", "care", seed, a, acc if stats == "covariance" else [1.0, 2.0, 3.0])
            (path / "config.toml").write_text(f'[method_config]\nca_stats = "{stats}"\nlr = 0.1\n'
                                              f'[run]\nseed = {seed}\n')
    board = leaderboard([load_run(p) for p in find_runs([tmp_path / "covariance", tmp_path / "lowrank"])])
    assert sorted(board.method) == ["care (method.ca_stats=covariance)", "care (method.ca_stats=lowrank)"]
    cov = board[board.method == "care (method.ca_stats=covariance)"].iloc[0]
    assert cov.n_seeds == 2 and cov.last_acc == pytest.approx(70.0)
    low = board[board.method == "care (method.ca_stats=lowrank)"].iloc[0]
    assert low.n_seeds == 2 and low.last_acc == pytest.approx(3.0)
