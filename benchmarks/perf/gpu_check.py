"""GPU readiness: does cilbench run, scale, repeat and resume on this GPU? One table, non-zero exit on a failure.

    python benchmarks/perf/gpu_check.py [--out runs/gpu_check] [--skip-scaling] [--cpu-smoke]

On a machine with CUDA (about 10 minutes on one recent GPU):
1. every registered method learns 2 tasks of ``synth-2`` on ``--device cuda`` in fp32, bf16 and fp16
   (fp16 through the engine's GradScaler); a method that refuses a precision by design is listed as
   refused, anything else that raises is a failure;
2. CaRE's sparse vs dense dispatch on a randomly initialised ViT-B/16 at T = 1, 10, 50, 100, 301 tasks:
   images/s as a ratio to the plain backbone, and the activations a training step saves
   (``benchmarks/perf/care_speed.py``'s measurement);
3. determinism: finetune on synth-2 twice with ``run.deterministic = true`` gives the same hits matrix;
4. resume: the same run SIGKILLed at its 5th training batch and resumed gives that matrix too.
Without CUDA it is a dry run: it says which parts need a GPU and exits 0 (``--cpu-smoke`` runs part 1 in
fp32 and parts 3-4 on the CPU instead, to exercise this script). The CUDA parts are covered by
``tests/test_gpu_check.py``, whose tests are skipped, not passed, without a GPU.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[2]
BENCH = "synth-2"
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class Check:
    part: str
    what: str
    status: str        # "ok" | "refused" | "FAIL" | "skipped"
    detail: str = ""


def run_cli(args: list[str], kill_at: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CILBENCH_KILL_AT"}
    if kill_at:
        env["CILBENCH_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "cilbench.cli", "run", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def hits(folder: Path) -> np.ndarray:
    return pd.read_csv(folder / "top1_hits.csv", index_col=0).to_numpy()


def check_methods(device: str, precisions: tuple[str, ...], out: Path) -> list[Check]:
    """Part 1: every method, 2 tasks, each precision (in this process: no start-up per run)."""
    from cilbench.benchmark import load_benchmark_files
    from cilbench.errors import ConfigError
    from cilbench.registry import METHODS
    from cilbench.runner import RunRequest, execute, resolve

    load_benchmark_files()
    checks = []
    for method in METHODS.names():
        for precision in precisions:
            what = f"{method} {precision}"
            try:
                resolved = resolve(RunRequest(method, BENCH, device=device, out=str(out / "methods"),
                                              name=f"{method}-{precision}", sets=[f"run.precision={precision}"]))
            except ConfigError as e:   # a method that refuses the precision (or the protocol) says why
                checks.append(Check("methods", what, "refused", e.cause))
                continue
            started = time.time()
            try:
                rd = execute(resolved, force=True)
                acc = rd.read_summary()["metrics"]["last_acc"]
                checks.append(Check("methods", what, "ok", f"A_B {acc:.1f}% in {time.time() - started:.0f} s"))
            except Exception as e:   # noqa: BLE001 -- any failure is reported, the others still run
                checks.append(Check("methods", what, "FAIL", f"{type(e).__name__}: {str(e)[:160]}"))
    return checks


def check_scaling(device: str) -> list[Check]:
    """Part 2: CaRE sparse vs dense on a random ViT-B/16 at T = 1..301."""
    spec = importlib.util.spec_from_file_location("care_speed", REPO / "benchmarks" / "perf" / "care_speed.py")
    care_speed = importlib.util.module_from_spec(spec)
    sys.modules["care_speed"] = care_speed
    spec.loader.exec_module(care_speed)
    rows: list[dict] = []
    try:
        care_speed.run_arch("vitb", [1, 10, 50, 100, 301], 8, torch.device(device), 3, 40.0, rows)
    except Exception as e:   # noqa: BLE001
        return [Check("scaling", "CaRE ViT-B/16 T=1..301", "FAIL", f"{type(e).__name__}: {str(e)[:160]}")]
    checks = []
    for row in rows:
        if row["path"] == "backbone":
            continue
        what = f"CaRE {row['path']} {row['mode']} T={row['T']}"
        if row.get("note"):
            checks.append(Check("scaling", what, "skipped", row["note"]))
            continue
        detail = f"{row['img_per_s']:.0f} img/s ({row['vs_backbone']:.2f}x backbone)"
        if "saved_activation_mb" in row:
            detail += f", saved activations {row['saved_activation_mb']:.0f} MB"
        checks.append(Check("scaling", what, "ok", detail))
    return checks


def check_repeat_and_resume(device: str, out: Path) -> list[Check]:
    """Parts 3-4: the same seed twice, and a SIGKILL + resume, give the same matrix (deterministic on)."""
    base = ["--method", "finetune", "--bench", BENCH, "--device", device, "--out", str(out / "repeat"),
            "--set", "run.deterministic=true", "--set", "method.epochs=2"]
    results = [run_cli([*base, "--name", name, "--force"]) for name in ("a", "b")]
    failed = [r for r in results if r.returncode != 0]
    if failed:
        return [Check("determinism", "finetune twice", "FAIL", failed[0].stderr[-300:])]
    same = np.array_equal(hits(out / "repeat" / "a"), hits(out / "repeat" / "b"), equal_nan=True)
    checks = [Check("determinism", "finetune twice, same seed", "ok" if same else "FAIL",
                    "identical hits matrix" if same else "the two runs differ")]
    killed = run_cli([*base, "--name", "killed", "--force"], kill_at="train:5")
    resumed = run_cli([*base, "--name", "killed"])
    if killed.returncode != -9 or resumed.returncode != 0:
        return checks + [Check("resume", "SIGKILL at batch 5, resume", "FAIL",
                               f"kill rc {killed.returncode}, resume rc {resumed.returncode}: {resumed.stderr[-200:]}")]
    same = np.array_equal(hits(out / "repeat" / "a"), hits(out / "repeat" / "killed"), equal_nan=True)
    return checks + [Check("resume", "SIGKILL at batch 5, resume", "ok" if same else "FAIL",
                           "matrix equals the uninterrupted run" if same else "the resumed run differs")]


def table(checks: list[Check]) -> str:
    lines = ["| part | check | status | detail |", "|---|---|---|---|"]
    lines += [f"| {c.part} | {c.what} | {c.status} | {c.detail} |" for c in checks]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="run folders (default: a temporary folder)")
    ap.add_argument("--skip-scaling", action="store_true", help="leave out part 2 (the longest)")
    ap.add_argument("--cpu-smoke", action="store_true", help="without CUDA: run parts 1 (fp32), 3 and 4 on the CPU")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cilbench-gpu-check-"))
    cuda = torch.cuda.is_available()
    checks: list[Check] = []
    if cuda:
        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
        checks += check_methods("cuda", PRECISIONS, out)
        checks += [] if args.skip_scaling else check_scaling("cuda")
        checks += check_repeat_and_resume("cuda", out)
    else:
        print("no CUDA device: a dry run; every CUDA part below is skipped (not passed)", flush=True)
        if args.cpu_smoke:
            checks += check_methods("cpu", ("fp32",), out)
            checks += check_repeat_and_resume("cpu", out)
        parts = [("methods", "every method, 2 tasks, fp32 / bf16 / fp16"),
                 ("scaling", "CaRE sparse vs dense, ViT-B/16, T = 1..301"),
                 ("determinism", "finetune twice with run.deterministic"), ("resume", "SIGKILL and resume")]
        checks += [Check(part, what + " on CUDA", "skipped", "no CUDA device") for part, what in parts]
    print(table(checks))
    failures = [c for c in checks if c.status == "FAIL"]
    print(f"{sum(c.status == 'ok' for c in checks)} ok, {sum(c.status == 'refused' for c in checks)} refused by "
          f"design, {sum(c.status == 'skipped' for c in checks)} skipped, {len(failures)} failed; runs in {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
