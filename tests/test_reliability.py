"""Reliability: crashes at any instant resume to the uninterrupted result; bad input gets a clear error.

``python -m tests.test_reliability`` prints the README's table of bad inputs and what the user sees.
"""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cilbench.cli import main
from tests.conftest import TINY_BENCH

KILL_SETS = {"simplecil": [], "care": ["method.tuned_epoch=2", "method.crct_epochs=1"]}
N_TASKS = 6  # tiny-6


# ---- helpers ------------------------------------------------------------------------------------
def run_cmd(method: str, out: Path, name: str, extra=()) -> list[str]:
    sets = [a for s in [*KILL_SETS.get(method, []), "run.threads=1", *extra] for a in ("--set", s)]
    return [sys.executable, "-m", "cilbench.cli", "run", "--method", method, "--bench", "tiny-6",
            "--out", str(out), "--name", name, *sets]


def run_proc(cmd: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CILBENCH_KILL_AT"}
    if kill_at:
        env["CILBENCH_KILL_AT"] = kill_at
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def matrix(run_dir: Path) -> np.ndarray:
    return pd.read_csv(run_dir / "accuracy_matrix.csv", index_col=0).to_numpy()


def tasks_done(run_dir: Path) -> int:
    ckpt = run_dir / "checkpoint" / "state.pt"
    return torch.load(ckpt, weights_only=False)["tasks_done"] if ckpt.exists() else 0


def n_events(run_dir: Path) -> int:
    path = run_dir / "events.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def start_and_wait_for_a_task(cmd: list[str], run_dir: Path) -> subprocess.Popen:
    """Start a run and return once it has logged one more finished task (it is still running)."""
    before = n_events(run_dir)
    env = {k: v for k, v in os.environ.items() if k != "CILBENCH_KILL_AT"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while n_events(run_dir) <= before and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, each in a fresh process like the interrupted ones."""
    out = tmp_path_factory.mktemp("reference")
    cache = {}

    def get(method: str) -> np.ndarray:
        if method not in cache:
            done = run_proc(run_cmd(method, out, method))
            assert done.returncode == 0, done.stdout + done.stderr
            cache[method] = matrix(out / method)
        return cache[method]
    return get


# ---- crashes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(KILL_SETS))
def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_matrix(tmp_path, method, reference):
    rng = random.Random(f"kill points {method}")
    plan = [f"train:{rng.randint(1, 2)}", "write:state.pt:1", f"test:{rng.randint(1, 2)}", "external",
            "write:state.pt:2", f"train:{rng.randint(1, 2)}"]
    run_dir = tmp_path / "cut"
    cmd = run_cmd(method, tmp_path, "cut")
    progress = []
    for point in plan:
        if point == "external":  # from outside, right after a task's event line (checkpoint may be mid-write)
            proc = start_and_wait_for_a_task(cmd, run_dir)
            proc.send_signal(signal.SIGKILL)
            code = proc.wait()
        else:
            code = run_proc(cmd, kill_at=point).returncode
        assert code == -signal.SIGKILL, f"{point}: the run was not killed (exit {code})"
        if point.startswith("write:"):
            assert list((run_dir / "checkpoint").glob(".state.pt.*.tmp")), "no torn temporary file was left"
        progress.append(tasks_done(run_dir))  # the checkpoint left behind always loads
    assert progress == sorted(progress) and 0 < progress[-1] < N_TASKS, progress
    done = run_proc(cmd)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resuming {run_dir} after task {progress[-1]}/" in done.stderr
    np.testing.assert_array_equal(matrix(run_dir), reference(method))
    assert not list(run_dir.rglob(".*.tmp"))
    assert n_events(run_dir) == N_TASKS


def test_sigterm_saves_says_how_to_resume_and_resumes(tmp_path, reference):
    run_dir = tmp_path / "term"
    cmd = run_cmd("simplecil", tmp_path, "term")
    proc = start_and_wait_for_a_task(cmd, run_dir)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    out = " ".join(out.split())
    assert proc.returncode == 2 and "interrupted" in out and "run the same command again to resume" in out
    assert 1 <= tasks_done(run_dir) < N_TASKS
    assert "interrupted by signal 15" in (run_dir / "log.txt").read_text()
    assert run_proc(cmd).returncode == 0
    np.testing.assert_array_equal(matrix(run_dir), reference("simplecil"))


def test_signals_wait_for_the_deferred_block_even_when_another_thread_takes_them():
    import threading

    from cilbench.runner import _Interrupt, _Interrupts

    done = []
    with _Interrupts() as interrupts:
        with pytest.raises(_Interrupt):
            with interrupts.deferred():
                thread = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM))
                thread.start()
                thread.join()
                time.sleep(0.05)  # the handler has run by now, and must not have raised
                done.append("checkpoint written")
        assert done == ["checkpoint written"] and interrupts.signum == signal.SIGTERM
        with pytest.raises(_Interrupt):
            os.kill(os.getpid(), signal.SIGINT)  # outside deferred(): at once
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_disk_full_keeps_the_previous_task_and_resumes(tmp_path, monkeypatch, capsys):
    argv = ["run", "--method", "simplecil", "--bench", "tiny-3", "--out", str(tmp_path)]
    assert main([*argv, "--name", "full"]) == 0
    real_fsync, calls = os.fsync, []

    def fsync_no_space(fd):
        if ".state.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            calls.append(fd)
            if len(calls) == 2:  # the checkpoint of the second task
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_no_space)
    assert main([*argv, "--name", "cut"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "No space left on device" in out and "intact" in out and "resume" in out
    assert tasks_done(tmp_path / "cut") == 1 and not list((tmp_path / "cut").rglob(".*.tmp"))
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert main([*argv, "--name", "cut"]) == 0
    np.testing.assert_array_equal(matrix(tmp_path / "cut"), matrix(tmp_path / "full"))


def test_unreadable_images_can_be_skipped_and_are_listed(tmp_path, toy_data):
    broken = [toy_data / "toy" / "test" / "bee" / "broken.png", toy_data / "toy" / "train" / "ant" / "cut.jpg"]
    for path in broken:
        path.write_bytes(b"\x89PNG truncated")
    argv = ["run", "--method", "simplecil", "--bench", "rel-2", "--out", str(tmp_path / "res"),
            "--data-root", str(toy_data), "--set", "run.bad_images=skip"]
    assert main(argv) == 0
    listed = (tmp_path / "res" / "rel-2__simplecil__s1993" / "skipped_images.txt").read_text()
    assert sorted(line.split("\t")[0] for line in listed.splitlines()) == sorted(map(str, broken))


# ---- bad input: one line of cause, one of remedy, exit 2, no traceback -------------------------------
@pytest.fixture
def toy_data(tmp_path, bench_dir):
    from cilbench.benchmark import load_benchmark_files
    from tests.test_data import write_tree

    (bench_dir / "reliability.toml").write_text(
        '[dataset.rel]\ndisplay = "Toy folder"\nsource = "imagefolder"\nfolder = "toy"\nn_classes = 3\n'
        'image_size = 32\n\n[benchmark.rel-2]\ndataset = "rel"\ninit = 1\nincrement = 2\n')
    load_benchmark_files()
    return write_tree(tmp_path / "data", per_class=(3, 2), size=40)


def _imagefolder(root: Path, tweak) -> list[str]:
    tweak(root)
    return ["--bench", "rel-2", "--data-root", str(root)]


def _unfinished_run(root: Path, tweak) -> list[str]:
    assert main(["run", "--method", "simplecil", "--bench", "tiny-3", "--out", str(root), "--name", "r"]) == 0
    summary = root / "r" / "summary.json"
    summary.write_text(summary.read_text().replace('"finished"', '"running"'))
    tweak(root / "r")
    return ["--bench", "tiny-3", "--out", str(root), "--name", "r"]


def _rm(path: Path) -> None:
    import shutil
    shutil.rmtree(path)


# (what the user does wrong, how the test makes it, text the message must hold)
BAD_INPUTS = [
    ("unknown method", lambda d: ["--method", "simplecl", "--bench", "tiny-3"], "did you mean 'simplecil'"),
    ("unknown benchmark", lambda d: ["--bench", "synth-30"], "did you mean 'synth-301'"),
    ("dataset folder missing", lambda d: _imagefolder(d, lambda r: _rm(r / "toy")), "Toy folder not found"),
    ("wrong folder layout (no test/)", lambda d: _imagefolder(d, lambda r: _rm(r / "toy" / "test")),
     "has no test/ folder"),
    ("train/ and test/ classes differ", lambda d: _imagefolder(d, lambda r: _rm(r / "toy" / "test" / "cat")),
     "only in train: ['cat']"),
    ("class count differs from the benchmark",
     lambda d: _imagefolder(d, lambda r: [(r / "toy" / p / "dog").mkdir() for p in ("train", "test")]),
     "has 4 classes; Toy folder has 3"),
    ("corrupt image (default: fail)",
     lambda d: _imagefolder(d, lambda r: (r / "toy" / "train" / "bee" / "bad.png").write_bytes(b"junk")),
     "cannot read image"),
    ("wrong type in --set", lambda d: ["--bench", "tiny-3", "--set", "method.batch_size=big"], "wrong type"),
    ("out-of-range value", lambda d: ["--bench", "tiny-3", "--set", "run.eval_every=0"], "out of range"),
    ("unknown key in --set", lambda d: ["--bench", "tiny-3", "--set", "run.sed=1"], "did you mean 'seed'"),
    ("unknown key in cilbench.toml", lambda d: ["--bench", "tiny-3", "--config", str(_toml(d, "[run]\nthreds = 2\n"))],
     "did you mean 'threads'"),
    ("unknown method section in cilbench.toml",
     lambda d: ["--bench", "tiny-3", "--config", str(_toml(d, "[methods.simplecill]\n"))],
     "[methods.simplecill] names no registered method"),
    ("broken cilbench.toml", lambda d: ["--bench", "tiny-3", "--config", str(_toml(d, "[run\n"))], "not valid TOML"),
    ("--device cuda without CUDA", lambda d: ["--bench", "tiny-3", "--device", "cuda"], "CUDA is not available"),
    ("output folder not writable", lambda d: ["--bench", "tiny-3", "--out", str(_file(d) / "sub")],
     "--out or [output] root"),
    ("finished run started again", lambda d: _unfinished_run(d, _finish), "already finished"),
    ("resume with other settings", lambda d: _unfinished_run(d, lambda r: None) + ["--set", "run.seed=7"],
     "different configuration"),
    ("corrupt checkpoint", lambda d: _unfinished_run(d, lambda r: (r / "checkpoint" / "state.pt").write_bytes(b"x")),
     "cannot be read"),
    ("--resume with nothing to resume", lambda d: ["--bench", "tiny-3", "--out", str(d), "--resume"],
     "holds no unfinished run"),
    ("resume under other code", lambda d: _unfinished_run(d, _other_code), "would mix the two"),
    ("online setting on an offline run", lambda d: ["--bench", "tiny-3", "--set", "run.online_iters=4"],
     "applies to the online protocol only"),
    ("multi-pass method under --online", lambda d: ["--method", "aper", "--bench", "tiny-3", "--online"],
     "run it offline"),
    ("mixed precision on the CPU", lambda d: ["--bench", "tiny-3", "--set", "run.precision=bf16"],
     "CUDA autocast only"),
]


def _other_code(run_dir: Path) -> None:
    """The unfinished run as if started by another code version."""
    env = json.loads((run_dir / "environment.json").read_text())
    env["code_history"][0]["code"] = {"package": "0.0.9", "sources_sha256": "0" * 64}
    (run_dir / "environment.json").write_text(json.dumps(env))


def test_a_run_from_before_a_setting_existed_resumes_after_the_upgrade(tmp_path):
    import tomli_w
    import tomllib

    argv = ["run", "--method", "simplecil", "--bench", "tiny-3", "--out", str(tmp_path), "--name", "old"]
    assert main(argv) == 0
    run_dir = tmp_path / "old"
    cfg = tomllib.loads((run_dir / "config.toml").read_text())
    del cfg["run"]["shots"], cfg["run"]["online"]  # as written by a cilbench without these settings
    (run_dir / "config.toml").write_text(tomli_w.dumps(cfg))
    _finish(run_dir)
    summary = run_dir / "summary.json"
    summary.write_text(summary.read_text().replace('"finished"', '"running"'))
    assert main(argv) == 0  # resumed: nothing left to run, the summaries are completed
    assert '"finished"' in summary.read_text() and (run_dir / "curves.png").exists()
    assert main([*argv[:-2], "--name", "old", "--force"]) == 0
    (run_dir / "config.toml").write_text(tomli_w.dumps(cfg))
    summary.write_text(summary.read_text().replace('"finished"', '"running"'))
    assert main([*argv, "--shots", "2"]) == 2  # a new setting at a new value is a different run


def test_benchmark_file_missing_a_field_is_a_config_error(tmp_path):
    from cilbench.benchmark import parse_benchmark_file
    from cilbench.errors import ConfigError

    path = tmp_path / "mine.toml"
    path.write_text('[dataset.d]\nsource = "imagefolder"\nn_classes = 3\nimage_size = 32\n')
    with pytest.raises(ConfigError, match=r"lacks \['display'\]"):
        parse_benchmark_file(path)
    path.write_text(path.read_text() + 'display = "D"\n[benchmark.b]\ndataset = "d"\n')
    with pytest.raises(ConfigError, match="no increment"):
        parse_benchmark_file(path)


def _toml(folder: Path, text: str) -> Path:
    path = folder / "user.toml"
    path.write_text(text)
    return path


def _file(folder: Path) -> Path:
    path = folder / "a-file"
    path.write_text("")
    return path


def _finish(run_dir: Path) -> None:
    summary = run_dir / "summary.json"
    summary.write_text(summary.read_text().replace('"running"', '"finished"'))


def cli_error(argv_tail: list[str], folder: Path) -> tuple[int, str]:
    import io

    from rich.console import Console

    import cilbench.cli as cli

    argv = ["run", *([] if "--method" in argv_tail else ["--method", "simplecil"]), *argv_tail]
    if "--out" not in argv:
        argv += ["--out", str(folder / "results")]
    buf = io.StringIO()
    old, cli.console = cli.console, Console(file=buf, width=1000)
    try:
        code = main(argv)
    finally:
        cli.console = old
    return code, buf.getvalue()


@pytest.mark.parametrize("what,make,expected", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_a_one_line_cause_and_remedy(what, make, expected, tmp_path, toy_data):
    code, out = cli_error(make(toy_data), tmp_path)
    lines = out.strip().splitlines()
    assert code == 2, out
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].lstrip().startswith("-> "), out
    assert expected in lines[0] + lines[1] and "Traceback" not in out


def reliability_table(folder: Path) -> str:
    """Markdown table: each bad input and the two lines the user sees (paths shortened)."""
    from cilbench.benchmark import load_benchmark_files
    from cilbench.provenance import code_label, code_version
    from tests.test_data import write_tree

    os.environ["CILBENCH_BENCHMARKS"] = str(folder / "benchmarks")
    os.environ["CILBENCH_CACHE"] = str(folder / "cache")
    (folder / "benchmarks").mkdir()
    (folder / "benchmarks" / "reliability.toml").write_text(
        '[dataset.rel]\ndisplay = "Toy folder"\nsource = "imagefolder"\nfolder = "toy"\nn_classes = 3\n'
        'image_size = 32\n\n[benchmark.rel-2]\ndataset = "rel"\ninit = 1\nincrement = 2\n' + TINY_BENCH)
    load_benchmark_files()
    this_code = code_label(code_version())
    rows = ["| bad input | what the user sees (exit code 2) |", "|---|---|"]
    for i, (what, make, _) in enumerate(BAD_INPUTS):
        case = folder / f"case{i}"
        data = write_tree(case / "data", per_class=(3, 2), size=40)
        _, out = cli_error(make(data), case)
        text = " ".join(out.split()).replace(str(case), "…").replace("|", "\\|").replace("`", "'")
        text = text.replace(f"this is {this_code}", "this is <the current code>")
        rows.append(f"| {what} | `{text}` |")
    return "\n".join(rows)


if __name__ == "__main__":
    import tempfile

    os.environ["CILBENCH_CONFIG"] = "/nonexistent/cilbench.toml"
    with tempfile.TemporaryDirectory() as tmp:
        print(reliability_table(Path(tmp)))
