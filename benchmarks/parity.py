"""Re-run stored runs with the current code and compare their per-cell counts, bit for bit.

    python benchmarks/parity.py results/runs/readme/synth-10__*          # every stored synth-10 run
    python benchmarks/parity.py --jobs 2 --set method.lr=0.1 RUN_DIR    # with a change on top

Each run is rebuilt from its stored ``config.toml`` (every method and run setting passed explicitly, so
defaults that moved elsewhere cannot change it), run into a temporary folder, and its images scored,
top-1 and top-5 hits per cell compared with the stored ones. Settings the current code no longer has
are dropped when the method declares their stored value equivalent (``Method.removed_settings``);
otherwise the run is reported as not comparable. Prints one line per run and exits 1 on any difference.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

COUNTS = ("sample_counts.csv", "top1_hits.csv", "top5_hits.csv")
SKIP_RUN = {"out_root", "data_root"}


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def command(stored: dict, out: Path, extra: list[str]) -> list[str]:
    from cilbench.registry import METHODS

    cls = METHODS.get(stored["method"])
    fields = set(cls.Config.__dataclass_fields__)
    sets = []
    for key, value in stored["method_config"].items():
        if key in fields:
            sets.append(f"method.{key}={toml_value(value)}")
        elif cls.removed_settings.get(key, object()) != value:
            raise ValueError(f"method.{key}={value!r} is no longer a setting of {cls.name}")
    sets += [f"run.{k}={toml_value(v)}" for k, v in stored["run"].items() if k not in SKIP_RUN and v is not None]
    sets += [f"backbone.{k}={toml_value(v)}" for k, v in stored["backbone"].items()]
    cmd = [sys.executable, "-m", "cilbench.cli", "run", "--method", stored["method"], "--bench", stored["benchmark"],
           "--out", str(out), "--name", "run"]
    for s in sets + extra:
        cmd += ["--set", s]
    return cmd


def compare(run_dir: Path, extra: list[str]) -> tuple[str, bool]:
    stored = tomllib.loads((run_dir / "config.toml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        try:
            cmd = command(stored, Path(tmp), extra)
        except ValueError as e:
            return f"{run_dir.name}: not comparable ({e})", False
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            return f"{run_dir.name}: the re-run failed: {proc.stderr.strip().splitlines()[-1:]}", False
        diffs = []
        for name in COUNTS:
            old, new = pd.read_csv(run_dir / name), pd.read_csv(Path(tmp) / "run" / name)
            if not old.equals(new):
                diffs.append(name)
        last = json.loads((Path(tmp) / "run" / "summary.json").read_text())["metrics"]["last_acc"]
    return (f"{run_dir.name}: {'identical' if not diffs else 'DIFFERS in ' + ', '.join(diffs)} "
            f"(last accuracy now {last})"), not diffs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each at the stored thread count)")
    p.add_argument("--set", action="append", default=[], help="an extra --set applied to every re-run")
    args = p.parse_args()
    runs = [d for d in args.run_dirs if (d / "config.toml").exists()]
    ok = True
    with ThreadPoolExecutor(args.jobs) as pool:
        for line, same in pool.map(lambda d: compare(d, args.set), runs):
            print(line, flush=True)
            ok &= same
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
