"""Regenerate the README's tables from what is stored, so no number in them is typed by hand.

    python benchmarks/readme_tables.py            # rewrite README.md (and results/leaderboard.*)
    python benchmarks/readme_tables.py --check    # exit 1 if README.md is out of date (writes nothing)

- The results table: `cilbench compare results/runs/readme --out results` (the runs of
  `benchmarks/sweeps/readme.toml`, whose `after` runs this script), trimmed
  to a few columns, plus the run folder(s) behind each row and the code version that made them. Every
  metric is recomputed from the stored matrices (``cilbench.compare``).
- The bad-input table: `python -m tests.test_reliability` (each bad input and the two lines it prints).
- The CaRE speed table: `results/perf/care_speed.csv` (sparse) and `care_speed_dense.csv` (dense), as
  written by `python benchmarks/perf/care_speed.py`: throughput as a ratio to the backbone per T, and
  the activations a training step saves.
- The input pipeline table: `results/perf/input_pipeline.md`, as written by
  `python benchmarks/perf/input_pipeline.py --out results/perf`.

Each table sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers in README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNS = [REPO / "results" / "runs" / "readme"]
COLUMNS = ["method", "benchmark", "Ā", "last acc", "forgetting (PILOT)", "forgetting (Chaudhry)", "added params",
           "train s", "eval s"]


def results_table(leaderboard_dir: Path) -> str:
    """The trimmed table; ``cilbench compare``'s full leaderboard and plots go to ``leaderboard_dir``."""
    from cilbench.compare import find_runs, load_run, to_markdown, write_comparison

    comparison = write_comparison([load_run(p) for p in find_runs(RUNS)], leaderboard_dir)
    board, table = comparison.board, comparison.table[COLUMNS]
    folders, codes = [], []
    for bench, method in zip(board.benchmark, board.method):
        group = [r for r in comparison.runs if r.benchmark == bench and r.method == method]
        folders.append(", ".join(f"`{r.path.relative_to(REPO / 'results' / 'runs')}`" for r in group))
        codes.append(", ".join(sorted({r.code for r in group})))
    table = table.assign(run=folders, code=codes)
    return to_markdown(table).strip()


def care_speed_table() -> str:
    import pandas as pd

    perf = REPO / "results" / "perf"
    df = pd.concat([pd.read_csv(perf / "care_speed.csv"), pd.read_csv(perf / "care_speed_dense.csv")])
    df = df[df.path != "backbone"]
    tasks = sorted(df["T"].unique())
    names = {"tiny": "tiny", "vitb": "ViT-B/16"}
    lines = ["| arch (batch) | path | " + " | ".join(f"T={t}" for t in tasks) + " | saved activations, train step |",
             "|" + "---|" * (len(tasks) + 3)]
    for arch in ("tiny", "vitb"):
        for mode in ("inference", "train"):
            for path in ("sparse", "dense"):
                rows = df[(df.arch == arch) & (df["mode"] == mode) & (df.path == path)].set_index("T")
                if rows.empty:
                    continue
                ratio = [f"{rows.vs_backbone[t]:.2f}" if t in rows.index and rows.vs_backbone[t] == rows.vs_backbone[t]
                         else "–" for t in tasks]
                mem = rows.saved_activation_mb.dropna()
                saved = f"{mem.iloc[0]:,.0f} MB (T={mem.index[0]}) → {mem.iloc[-1]:,.0f} MB (T={mem.index[-1]})" \
                    if mode == "train" and len(mem) else ""
                batch = int(rows.batch.iloc[0])
                lines.append(f"| {names[arch]} ({batch}) | {path} {mode} | " + " | ".join(ratio) + f" | {saved} |")
    return "\n".join(lines)


def input_pipeline_table() -> str:
    """`results/perf/input_pipeline.md`, written by `python benchmarks/perf/input_pipeline.py --out results/perf`."""
    return (REPO / "results" / "perf" / "input_pipeline.md").read_text().strip()


def bad_input_table() -> str:
    import os

    sys.path.insert(0, str(REPO))
    os.environ["CILBENCH_CONFIG"] = "/nonexistent/cilbench.toml"
    from tests.test_reliability import reliability_table

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):  # the runs' chatter
        return reliability_table(Path(tmp))


def replace_block(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no {begin} ... {end} block")
    return pattern.sub(lambda m: f"{begin}\n{body}\n{end}", text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether README.md is up to date")
    args = parser.parse_args()
    readme = REPO / "README.md"
    old = readme.read_text()
    with tempfile.TemporaryDirectory() as scratch:  # --check leaves results/leaderboard.* alone
        new = replace_block(old, "results", results_table(Path(scratch) if args.check else REPO / "results"))
    new = replace_block(new, "bad-input", bad_input_table())
    new = replace_block(new, "care-speed", care_speed_table())
    new = replace_block(new, "input-pipeline", input_pipeline_table())
    if args.check:
        print("README.md is up to date" if new == old else "README.md is out of date")
        return int(new != old)
    readme.write_text(new)
    print("README.md rewritten" if new != old else "README.md was already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
