"""Wall time of one grid run one after another and two at a time, measured side by side.

    python benchmarks/perf/sweep_parallel.py [--methods simplecil,l2p,...] [--bench synth-10] [--threads N]

Both are `cilbench sweep` on the same grid into fresh output roots, one after the other: sequential
(`--max-parallel 1`) and parallel (`--max-parallel 2`). Threads per run: by default the sweep's split
(every core for a sequential run, half for each parallel one); `--threads 1` fixes one thread per run,
as the README grid does (`benchmarks/sweeps/readme.toml`, for numbers reproducible per thread count).
Writes sweep_parallel.csv (wall s, learn s summed over runs) and prints the speed-up.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def sweep(methods: str, bench: str, parallel: int, root: Path, threads: int) -> tuple[float, dict[str, float]]:
    t0 = time.perf_counter()
    fixed = ["--set", f"run.threads={threads}"] if threads else []
    subprocess.run([sys.executable, "-m", "cilbench.cli", "sweep", "--methods", methods, "--benches", bench,
                    "--out", str(root), "--name", "p", "--max-parallel", str(parallel), "--no-compare", *fixed],
                   check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    learn = {p.parent.name: json.loads(p.read_text())["learn_s_total"] for p in root.glob("*/summary.json")}
    return wall, learn


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="simplecil,rwf,aper,finetune,samoe,l2p")
    p.add_argument("--bench", default="synth-10")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: the sweep's split)")
    p.add_argument("--out", default="runs/perf")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for parallel in (1, 2):
            wall, learn = sweep(args.methods, args.bench, parallel, Path(tmp) / f"p{parallel}", args.threads)
            rows.append({"max_parallel": parallel,
                         "threads_per_run": args.threads or max(1, (os.cpu_count() or 1) // parallel),
                         "runs": len(learn), "wall_s": round(wall, 1), "sum_learn_s": round(sum(learn.values()), 1)})
            print(f"--max-parallel {parallel}: {wall:.1f} s wall for {len(learn)} runs "
                  f"(learn time summed over runs {sum(learn.values()):.1f} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"sweep_parallel{'_t%d' % args.threads if args.threads else ''}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, rows[0].keys())
        w.writeheader()
        w.writerows(rows)
    print(f"speed-up of --max-parallel 2 over one after another: {rows[0]['wall_s'] / rows[1]['wall_s']:.2f}x "
          f"on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
