"""Leaderboards from run folders built out of known accuracy matrices (numbers checked by hand)."""

import numpy as np
import pandas as pd
import pytest

from cilbench.cli import main
from cilbench.compare import find_runs, leaderboard, load_run, write_comparison
from cilbench.metrics import forgetting_curve
from cilbench.results import RunDir

NAN = np.nan


def make_run(root, bench, method, seed, a, acc_all, n_tasks=None, learn=1.0, eval_=0.5, added=100, trainable=10,
             name=None, run_settings=None, order=1993):
    """Write a run folder as an older cilbench did (events with per-task accuracies and A_t, no
    counts), so compare's fallback for such runs is exercised; config.toml holds ``run_settings``."""
    n_done = len(acc_all)
    n_tasks = n_tasks or n_done
    rd = RunDir(root / (name or f"{bench}__{method}__s{seed}"))
    rd.path.mkdir(parents=True)
    cost = {"total": 1000 + added, "trainable": trainable, "added": added, "stored": 7}
    for t in range(n_done):
        evaluated = not np.isnan(acc_all[t])
        rd.append_event({"task": t, "learn_s": learn, "eval_s": eval_ if evaluated else 0.0,
                         "acc": acc_all[t] if evaluated else None,
                         "top5": min(100.0, acc_all[t] + 10) if evaluated else None,
                         "per_task": list(a[t][: t + 1]) if evaluated else None,
                         "peak_mem_mb": 50.0 + seed, "cost": cost})
    rd.write_summary({"status": "finished" if n_done == n_tasks else "running", "benchmark": bench,
                      "method": method, "seed": seed, "metrics": {"n_tasks": n_tasks}, "cost": cost,
                      "learn_s_total": learn * n_done, "eval_s_total": eval_ * n_done,
                      "peak_mem_mb": 50.0 + seed})
    if run_settings is not None or order != 1993:
        settings = {"seed": seed, "order_seed": order, **(run_settings or {})}
        (rd.path / "config.toml").write_text("[run]\n" + "".join(f"{k} = {v!r}\n".replace("'", '"')
                                                                for k, v in settings.items()))
    return rd.path


# PILOT forgetting (max over all rows): A1 (30 + 0)/2 = 15, A2 (30 + 20)/2 = 25
# Chaudhry (earlier rows): A1 (30 - 5)/2 = 12.5, A2 25 ; BWT: A1 (-30 + 5)/2 = -12.5, A2 (-30 - 20)/2 = -25
A1 = [[90, NAN, NAN], [70, 80, NAN], [60, 85, 75]]
A2 = [[80, NAN, NAN], [60, 90, NAN], [50, 70, 80]]


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
    assert alpha.seeds == "1,2" and alpha.n == 2 and alpha.orders == "1993"
    assert alpha.last_acc == pytest.approx(70.0)
    assert alpha.last_acc_std == pytest.approx(np.std([73.0, 67.0], ddof=1))
    assert alpha.avg_inc_acc == pytest.approx(np.mean([(90 + 75 + 73) / 3, (80 + 75 + 67) / 3]))
    assert alpha.forgetting_pilot == pytest.approx((15 + 25) / 2)
    assert alpha.forgetting_pilot_std == pytest.approx(np.std([15, 25], ddof=1))
    assert alpha.forgetting_chaudhry == pytest.approx((12.5 + 25) / 2)
    assert alpha.bwt == pytest.approx((-12.5 - 25) / 2)
    assert alpha.added_params == 100 and alpha.trainable_params == 10
    assert alpha.train_s == pytest.approx(3.0) and alpha.eval_s == pytest.approx(1.5)
    # these runs store the one memory column of cilbench <= 0.1 (on CPU: the process's peak RSS)
    assert alpha.process_peak_rss_mb == pytest.approx(51.5) and np.isnan(alpha.peak_cuda_mem_mb)
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
    table = write_comparison(runs, out, with_published=False).table
    csv = pd.read_csv(out / "leaderboard.csv")
    assert {"method", "benchmark", "seeds", "orders", "n", "avg_inc_acc", "last_acc", "forgetting_pilot",
            "forgetting_chaudhry", "forgetting_avalanche", "bwt",
            "trainable_params", "added_params", "train_s", "eval_s", "peak_cuda_mem_mb",
            "process_peak_rss_mb"} <= set(csv.columns)
    md = (out / "leaderboard.md").read_text()
    assert "70.00 ± 4.24" in md and "incomplete (1/3)" in md
    for name in ("b3_accuracy", "b3_forgetting", "b3_cost", "heatmaps/b3__alpha__s1__o1993"):
        assert (out / "plots" / f"{name}.png").exists() and (out / "plots" / f"{name}.svg").exists()
    # published numbers ride along only when asked, labelled as such
    make_run(results, "ob1k-301", "gamma", 1, [[50.0]], [50.0])
    runs = [load_run(p) for p in find_runs([results])]
    table = write_comparison(runs, out, with_published=True).table
    pub = table[table.method == "care (published)"]
    assert len(pub) == 1 and pub.iloc[0]["last acc"] == "68.51" and "CaRE" in pub.iloc[0]["status"]
    assert not (table.method == "care (published)").any() or (table.benchmark == "ob1k-301").any()


def test_forgetting_curve_matches_the_definition():
    a = np.array(A1, dtype=float)
    f = forgetting_curve(a)
    assert np.isnan(f[0])
    assert f[1] == pytest.approx(90 - 70)
    assert f[2] == pytest.approx(((90 - 60) + (85 - 85)) / 2)   # task 1 improved: max includes the last row


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
    assert cov.n == 2 and cov.last_acc == pytest.approx(70.0)
    low = board[board.method == "care (method.ca_stats=lowrank)"].iloc[0]
    assert low.n == 2 and low.last_acc == pytest.approx(3.0)


def test_runs_differing_in_an_evaluation_setting_are_separate_rows(tmp_path):
    for every, acc in ((1, [90.0, 75.0, 73.0]), (2, [90.0, NAN, 60.0])):
        make_run(tmp_path, "b3", "alpha", 1, A1, acc, name=f"every{every}", run_settings={"eval_every": every})
    board = leaderboard([load_run(p) for p in find_runs([tmp_path])])
    assert sorted(board.method) == ["alpha (run.eval_every=1)", "alpha (run.eval_every=2)"]
    assert board.set_index("method").loc["alpha (run.eval_every=2)", "last_acc"] == 60.0


def test_a_repeated_seed_counts_once_and_class_orders_aggregate_or_split(tmp_path):
    make_run(tmp_path, "b3", "alpha", 1, A1, [90.0, 75.0, 73.0], name="first")
    make_run(tmp_path, "b3", "alpha", 1, A1, [90.0, 75.0, 73.0], name="again")    # the same run made twice
    make_run(tmp_path, "b3", "alpha", 1, A2, [80.0, 75.0, 67.0], name="order7", order=7)
    runs = [load_run(p) for p in find_runs([tmp_path])]
    row = leaderboard(runs).iloc[0]
    assert (row.seeds, row.orders, row.n) == ("1", "7,1993", 2)           # not "1,1,1"
    assert row.last_acc == pytest.approx((73 + 67) / 2)
    split = leaderboard(runs, split_orders=True)
    assert sorted(split.method) == ["alpha (run.order_seed=1993)", "alpha (run.order_seed=7)"]
    assert list(split.n) == [1, 1]


def test_flagged_protocol_departures_are_tagged_even_alone(tmp_path):
    path = make_run(tmp_path, "b3", "l2p", 1, A1, [90.0, 75.0, 73.0])
    (path / "config.toml").write_text('method = "l2p"\n[method_config]\ntest_batch_vote = true\n')
    old = make_run(tmp_path / "old", "b3", "dualprompt", 1, A1, [90.0, 75.0, 73.0])
    (old / "config.toml").write_text('method = "dualprompt"\n[method_config]\nbatchwise_prompt = true\n')
    board = leaderboard([load_run(path), load_run(old)])
    # a dualprompt run from before test_batch_vote existed voted at test time: tagged too
    assert sorted(board.method) == ["dualprompt [test-batch vote]", "l2p [test-batch vote]"]


def test_runs_group_on_the_code_sources_not_on_the_commit(tmp_path):
    import json

    def code(path, commit, sources):
        summary = json.loads((path / "summary.json").read_text())
        summary["code"] = {"git_commit": commit, "sources_sha256": sources}
        summary["code_version"] = commit[:10]
        (path / "summary.json").write_text(json.dumps(summary))
    code(make_run(tmp_path, "b3", "alpha", 1, A1, [90.0, 75.0, 73.0]), "a" * 40, "1" * 64)
    code(make_run(tmp_path, "b3", "alpha", 2, A2, [80.0, 75.0, 67.0]), "b" * 40, "1" * 64)   # a docs-only commit
    code(make_run(tmp_path, "b3", "alpha", 3, A2, [80.0, 75.0, 60.0]), "c" * 40, "2" * 64)   # other sources
    board = leaderboard([load_run(p) for p in find_runs([tmp_path])])
    assert sorted(board.method) == ["alpha (code=src:1111111111)", "alpha (code=src:2222222222)"]
    assert board.set_index("method").loc["alpha (code=src:1111111111)", "n"] == 2
