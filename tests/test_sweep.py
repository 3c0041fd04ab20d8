"""`cilbench sweep` (issue 19): the grid's runs are exactly the runs `cilbench run` makes, on every
backend; a sweep killed mid-way resumes without repeating a run; submitit requeues a timed-out job."""
import csv
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from cilbench.cli import main

# two methods x one benchmark x two seeds; one thread everywhere, so every backend computes the same
GRID = ["--methods", "simplecil,l2p", "--benches", "tiny-3", "--seeds", "1,2", "--set", "run.threads=1",
        "--set", "l2p:method.epochs=1"]
RUNS = [f"tiny-3__{m}__s{s}" for m in ("simplecil", "l2p") for s in (1, 2)]
METRICS = ["method", "benchmark", "seeds", "n", "avg_inc_acc", "last_acc", "forgetting_pilot", "bwt",
           "trainable_params", "added_params"]


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cilbench.cli", *args], capture_output=True, text=True, **kw)


def hits(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "top1_hits.csv")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The four runs made one `cilbench run` at a time, and their leaderboard."""
    out = tmp_path_factory.mktemp("reference")
    for method in ("simplecil", "l2p"):
        for seed in (1, 2):
            extra = ["--set", "method.epochs=1"] if method == "l2p" else []
            proc = cli("run", "--method", method, "--bench", "tiny-3", "--seed", str(seed), "--out", str(out),
                       "--set", "run.threads=1", *extra)
            assert proc.returncode == 0, proc.stderr
    assert cli("compare", "--results", str(out)).returncode == 0
    return out


def board(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "leaderboard.csv")[METRICS].sort_values(["method"]).reset_index(drop=True)


@pytest.mark.parametrize("backend", ["local", "debug"])
def test_a_sweep_gives_the_leaderboard_of_the_same_runs_made_one_by_one(tmp_path, reference, backend):
    out = tmp_path / "runs"
    args = ["sweep", *GRID, "--out", str(out), "--name", "g", "--backend", backend]
    args += ["--max-parallel", "2"] if backend == "local" else []
    threads = torch.get_num_threads()
    try:
        code = main(args) if backend == "debug" else cli(*args).returncode
    finally:
        torch.set_num_threads(threads)              # the debug backend ran in this process
    assert code == 0
    folder = out / "sweeps" / "g"
    pd.testing.assert_frame_equal(board(folder), board(reference))
    for run in RUNS:
        pd.testing.assert_frame_equal(hits(out / run), hits(reference / run))
    status = list(csv.DictReader((folder / "status.csv").open()))
    assert [(r["run_id"], r["state"], r["attempts"], r["last_task"]) for r in status] == \
        [(run, "done", "1", "3") for run in sorted(RUNS, key=RUNS.index)]


def test_a_killed_sweep_resumes_without_repeating_a_finished_run(tmp_path, reference):
    out = tmp_path / "runs"
    args = ["sweep", *GRID, "--out", str(out), "--name", "k", "--max-parallel", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "cilbench.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    first = out / RUNS[0] / "summary.json"
    deadline = time.time() + 120
    while not (first.exists() and '"finished"' in first.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)            # the sweep and the run it was running, like a power cut
    proc.wait()
    finished_at = first.stat().st_mtime
    assert cli(*args).returncode == 0
    assert first.stat().st_mtime == finished_at                          # not run again
    logs = sorted(p.name for p in (out / "sweeps" / "k" / "logs").iterdir())
    assert logs.count(f"{RUNS[0]}.1.log") == 1 and f"{RUNS[0]}.2.log" not in logs
    for run in RUNS:
        pd.testing.assert_frame_equal(hits(out / run), hits(reference / run))


def test_ctrl_c_stops_launching_and_leaves_every_run_resumable(tmp_path):
    out = tmp_path / "runs"
    args = ["sweep", "--methods", "finetune", "--benches", "tiny-6", "--seeds", "1,2", "--set", "run.threads=1",
            "--set", "method.epochs=40", "--out", str(out), "--name", "i"]
    proc = subprocess.Popen([sys.executable, "-m", "cilbench.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    events = out / "tiny-6__finetune__s1" / "events.jsonl"
    deadline = time.time() + 120
    while not (events.exists() and events.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)               # Ctrl-C reaches the sweep and its run
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "every run is resumable" in output
    rows = {r["run_id"]: r for r in csv.DictReader((out / "sweeps" / "i" / "status.csv").open())}
    assert rows["tiny-6__finetune__s1"]["state"] == "interrupted" and rows["tiny-6__finetune__s1"]["failures"] == "0"
    assert rows["tiny-6__finetune__s2"]["state"] == "queued" and rows["tiny-6__finetune__s2"]["attempts"] == "0"
    assert cli(*args).returncode == 0                # the same command finishes both
    assert "resumed after task" in (out / "tiny-6__finetune__s1" / "log.txt").read_text()


def test_a_failed_run_is_retried_reported_and_does_not_stop_the_others(tmp_path):
    out = tmp_path / "runs"
    args = ["sweep", "--methods", "simplecil", "--benches", "tiny-3,tiny-6", "--out", str(out), "--name", "f",
            "--retries", "1", "--set", "run.threads=1"]
    held = out / "tiny-6__simplecil__s1993"          # the folder holds another run: every attempt is refused
    held.mkdir(parents=True)
    (held / "config.toml").write_text('benchmark = "tiny-6"\nmethod = "finetune"\n')
    proc = cli(*args)
    assert proc.returncode == 1
    rows = {r["run_id"]: r for r in csv.DictReader((out / "sweeps" / "f" / "status.csv").open())}
    assert rows["tiny-3__simplecil__s1993"]["state"] == "done"
    bad = rows["tiny-6__simplecil__s1993"]
    assert bad["state"] == "failed" and bad["attempts"] == bad["failures"] == "2"
    assert bad["error"].startswith("error:")
    assert Path(bad["log"]).exists()
    status = cli("sweep", "--status", str((out / "sweeps" / "f").resolve()), cwd="/")   # from anywhere
    assert "failed" in status.stdout and "1 done" in status.stdout


@pytest.mark.parametrize("extra, named", [(["--backend", "debug", "--max-parallel", "2"], "--max-parallel"),
                                          (["--partition", "gpu", "--gpus-per-run", "1"], "--partition, --gpus-per-run"),
                                          (["--emit-sbatch", "x.sbatch", "--max-parallel", "2"], "--max-parallel")])
def test_a_backend_option_the_backend_would_ignore_is_refused(tmp_path, capsys, extra, named):
    assert main(["sweep", *GRID, "--out", str(tmp_path), *extra]) == 2
    out = capsys.readouterr().out
    assert f"{named} would do nothing" in " ".join(out.split())
    assert not (tmp_path / "sweeps").exists()                      # refused before anything is written


def test_emit_sbatch_writes_a_job_array_of_the_runs(tmp_path):
    out = tmp_path / "runs"
    script = tmp_path / "grid.sbatch"
    assert main(["sweep", *GRID, "--out", str(out), "--name", "s", "--emit-sbatch", str(script),
                 "--partition", "gpu", "--gpus-per-run", "1", "--timeout-min", "90", "--array-parallelism", "3"]) == 0
    text = script.read_text()
    for line in ("#SBATCH --array=0-3%3", "#SBATCH --partition=gpu", "#SBATCH --gres=gpu:1", "#SBATCH --time=90",
                 "#SBATCH --requeue", 'eval "${JOBS[$SLURM_ARRAY_TASK_ID]}"'):
        assert line in text.splitlines()
    jobs = [shlex.split(line) for line in (out / "sweeps" / "s" / "jobs.txt").read_text().splitlines()]
    assert [j[:2] for j in jobs] == [["cilbench", "run"]] * 4
    assert [j[j.index("--name") + 1] for j in jobs] == RUNS
    assert all(j[j.index("--out") + 1] == str(out) for j in jobs)


def test_a_sweep_file_with_grids_variants_and_method_settings(tmp_path):
    from cilbench.sweep import Grid, expand

    sweep = tmp_path / "s.toml"
    sweep.write_text('name = "x"\nseeds = [1, 2]\n[[grid]]\nmethods = ["simplecil"]\nbenches = ["tiny-3"]\n'
                     '[[grid]]\nmethods = ["l2p"]\nbenches = ["tiny-3"]\nvariants = { short = ["method.epochs=1"] }\n'
                     'method_set = { l2p = ["method.lr=0.01"] }\n')
    file = Grid.from_toml(sweep)
    specs = expand(file.grids, tmp_path)
    assert file.name == "x" and [s.run_id for s in specs] == [
        "tiny-3__simplecil__s1", "tiny-3__simplecil__s2", "tiny-3__l2p__s1__short", "tiny-3__l2p__s2__short"]
    assert ["--set", "method.lr=0.01"] == list(specs[2].argv[-4:-2]) and specs[2].argv[-1] == "method.epochs=1"
    sweep.write_text('methods = ["simplecil"]\nbenches = ["tiny-3"]\nseedz = [1]\n')
    with pytest.raises(Exception, match="unknown keys"):
        Grid.from_toml(sweep)


def test_the_shipped_sweep_files_expand(tmp_path):
    from cilbench.sweep import Grid, expand

    repo = Path(__file__).resolve().parent.parent / "benchmarks" / "sweeps"
    sizes = {}
    for path in sorted(repo.glob("*.toml")):
        file = Grid.from_toml(path)
        sizes[file.name] = len(expand(file.grids, tmp_path))
    assert sizes == {"care-table1": 5 * 4, "readme": 34}


# ~6 s to start a process, then ~2.4 s per task: a 20 s time limit (signal 5 s before) cuts it once
SLOW_RUN = ["--methods", "finetune", "--benches", "tiny-6", "--seeds", "1993", "--set", "run.threads=1",
            "--set", "method.epochs=100"]


def test_submitit_requeues_a_timed_out_run_and_it_finishes_with_the_same_matrix(tmp_path):
    pytest.importorskip("submitit")
    out = tmp_path / "runs"
    ref = cli("run", "--method", "finetune", "--bench", "tiny-6", "--out", str(tmp_path / "ref"),
              "--set", "run.threads=1", "--set", "method.epochs=100")
    assert ref.returncode == 0, ref.stderr
    proc = cli("sweep", *SLOW_RUN, "--out", str(out), "--name", "q", "--backend", "submitit-local",
               "--timeout-min", str(20 / 60))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = out / "tiny-6__finetune__s1993"
    assert "resumed after task" in (run / "log.txt").read_text()                  # it was requeued
    pd.testing.assert_frame_equal(hits(run), hits(tmp_path / "ref" / "tiny-6__finetune__s1993"))


def test_a_sweep_file_runs_its_after_command_and_never_counts_a_run_made_otherwise(tmp_path):
    sweep = tmp_path / "s.toml"
    after = 'after = ["python", "-c", "open(\'after.txt\', \'w\').write(\'ok\')"]\n'
    grid = 'methods = ["simplecil"]\nbenches = ["tiny-3"]\nset = ["run.threads=1"]\nout = "runs"\n'
    sweep.write_text('name = "a"\n' + after + grid)
    assert cli("sweep", str(sweep), "--backend", "debug", cwd=tmp_path).returncode == 0
    assert (tmp_path / "after.txt").read_text() == "ok"                 # every run done: the report ran
    (tmp_path / "after.txt").unlink()
    sweep.write_text('name = "b"\n' + after + grid.replace('"run.threads=1"', '"run.threads=1", "method.batch_size=64"'))
    proc = cli("sweep", str(sweep), "--backend", "debug", cwd=tmp_path)
    assert proc.returncode == 1 and not (tmp_path / "after.txt").exists()
    row = next(csv.DictReader((tmp_path / "runs" / "sweeps" / "b" / "status.csv").open()))
    assert row["state"] == "conflict" and row["attempts"] == "0"        # the batch-128 run is not counted
