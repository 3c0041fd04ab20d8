"""`cilbench run | list | compare | sweep | reproduce | data | show | pretrain`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cilbench.errors import CilbenchError

console = Console()
if not console.is_terminal:  # logs and pipes: wide enough that tables are never truncated
    console = Console(width=160)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cilbench", description="Class-incremental learning benchmark suite")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run one method on one benchmark")
    p.add_argument("--method", required=True)
    p.add_argument("--bench", required=True)
    p.add_argument("--seed", type=int, help="initialisation and training seed (default 1993)")
    p.add_argument("--order-seed", type=int,
                   help="class-order seed (default: the benchmark's, 1993 = the papers' order); in the run name")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--data-root")
    p.add_argument("--out", help="output root (default: runs/)")
    p.add_argument("--name", help="run folder name (default: <bench>__<method>__s<seed>)")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--shots", type=int, help="few-shot protocol: N training images per class")
    p.add_argument("--online", action=argparse.BooleanOptionalAction, default=None,
                   help="online protocol: stream each training sample once (default: the method's/benchmark's)")
    p.add_argument("--config", help="cilbench.toml to read (default: ./cilbench.toml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a setting, e.g. method.lr=0.01, run.threads=2, backbone.weights=none")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--force", action="store_true", help="start over even if the run folder holds a run")
    again.add_argument("--resume", action="store_true",
                   help="only continue an unfinished run (an unfinished run folder is resumed anyway)")
    p.add_argument("--allow-code-change", action="store_true",
                   help="resume a run started under another code version (the run records both)")

    sub.add_parser("list", help="registered methods and benchmarks")

    p = sub.add_parser("compare", help="leaderboards and plots from run folders")
    p.add_argument("run_dirs", nargs="*", help="run folders, or folders of run folders")
    p.add_argument("--results", help="folder of run folders (default: runs/ when no RUN_DIRS)")
    p.add_argument("--bench", nargs="+", help="only these benchmarks")
    p.add_argument("--methods", nargs="+", help="only these methods")
    p.add_argument("--out", help="output folder (default: the results folder)")
    p.add_argument("--with-published", action="store_true",
                   help="add the papers' published numbers, labelled as such")
    p.add_argument("--split-orders", action="store_true",
                   help="one row per class order (default: a row aggregates over seeds and class orders)")

    p = sub.add_parser("sweep", help="a grid of runs on this machine or a SLURM cluster, resumable")
    p.add_argument("sweep_file", nargs="?", help="a sweep TOML (benchmarks/sweeps/*.toml); flags below override it")
    p.add_argument("--methods", nargs="+", help="methods (space- or comma-separated)")
    p.add_argument("--benches", nargs="+", help="benchmarks")
    p.add_argument("--seeds", nargs="+", help="seeds (default 1993)")
    p.add_argument("--order-seeds", nargs="+", help="class-order seeds (default: the benchmark's)")
    p.add_argument("--set", action="append", default=[], metavar="[METHOD:]SECTION.KEY=VALUE",
                   help="a setting for every run, or with METHOD: for that method's runs")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:SECTION.KEY=VALUE[,...]",
                   help="a named set of settings; the grid runs each variant (its name joins the run name)")
    p.add_argument("--online", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--shots", type=int)
    p.add_argument("--out", help="output root of the runs (default: runs/); the sweep folder is OUT/sweeps/NAME")
    p.add_argument("--name", help="sweep name (default: the sweep file's name, else a hash of the grid)")
    _add_backend_args(p)
    p.add_argument("--dry-run", action="store_true", help="list the runs and stop")
    p.add_argument("--status", metavar="SWEEP_DIR", help="show the status table of a sweep (running anywhere)")

    p = sub.add_parser("reproduce", help="run a paper's published cells (a manifest) and report cell by cell")
    p.add_argument("manifest", help="benchmarks/reproduce/*.toml")
    p.add_argument("--cells", nargs="+", default=[], help="only these cells (ids, tables, methods or benchmarks; globs)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a setting for every run, e.g. run.data_root=/data")
    p.add_argument("--out", help="output root of the runs (default: runs/); the report goes to OUT/sweeps/NAME")
    p.add_argument("--dry-run", action="store_true", help="list the cells, their runs and estimated hours, and stop")
    p.add_argument("--report-only", action="store_true", help="run nothing; report from the runs already there")
    p.add_argument("--calibrate", nargs="+", metavar="DIR",
                   help="finished runs that calibrate the cost model (default: runs/ and results/runs)")
    p.add_argument("--tflops", type=float, help="effective TFLOP/s assumed where no run calibrates (default 50)")
    _add_backend_args(p)

    p = sub.add_parser("data", help="check a dataset against its published split, or prepare it from a download")
    data = p.add_subparsers(dest="data_command", required=True)
    q = data.add_parser("check", help="layout, class and image counts, unreadable images, train/test duplicates")
    q.add_argument("bench", help="a benchmark (its dataset is checked and its class order printed)")
    q.add_argument("--no-decode", action="store_true", help="skip decoding every image and hashing for duplicates")
    q.add_argument("--workers", type=int, help="processes decoding images (default: every core)")
    q.add_argument("--verbose", action="store_true", help="print progress")
    q = data.add_parser("prepare", help="turn a download (PILOT zip/tgz, Hugging Face parquet) into the layout")
    q.add_argument("dataset", help="a dataset key (imagenet-r, vtab, ob1k, ...) or a benchmark using it")
    q.add_argument("--from", dest="source", required=True, help="the downloaded archive or snapshot folder")
    q.add_argument("--no-verify", action="store_true", help="skip the md5 check of an archive")
    for q in data.choices.values():
        q.add_argument("--data-root", help="default: $CILBENCH_DATA or cilbench.toml [data] root")
        q.add_argument("--config", help="cilbench.toml to read (default: ./cilbench.toml)")

    p = sub.add_parser("show", help="summary of one run folder")
    p.add_argument("run_dir")

    p = sub.add_parser("pretrain", help="(re)build the embedded tiny ViT weights")
    p.add_argument("--out", default=None)
    p.add_argument("--epochs", type=int)
    p.add_argument("--classes", type=int)
    p.add_argument("--per-class", type=int)

    args = parser.parse_args(argv)
    try:
        commands = {"run": _run, "list": _list, "compare": _compare, "sweep": _sweep, "show": _show,
                    "pretrain": _pretrain, "data": _data, "reproduce": _reproduce}
        return commands[args.command](args)
    except CilbenchError as e:
        if args.debug:
            raise
        console.print(f"[bold red]error:[/] {escape(e.cause)}")
        if e.remedy:
            console.print(f"  [yellow]->[/] {escape(e.remedy)}")
        return 2


def _data(args) -> int:
    from cilbench.data import commands

    run = commands.check_command if args.data_command == "check" else commands.prepare_command
    return run(args, console)


def _run(args) -> int:
    from cilbench.progress import ConsoleReporter
    from cilbench.runner import RunRequest, execute, resolve

    req = RunRequest(method=args.method, bench=args.bench, seed=args.seed, device=args.device,
                     data_root=args.data_root, out=args.out, name=args.name, sets=args.set,
                     config_path=args.config, eval_every=args.eval_every, shots=args.shots, online=args.online,
                     order_seed=args.order_seed)
    resolved = resolve(req)
    title = f"{resolved.method_cls.name} on {resolved.bench.name}"
    rd = execute(resolved, lambda n: ConsoleReporter(n, title), force=args.force, resume_only=args.resume,
                 allow_code_change=args.allow_code_change)
    _print_summary(rd.path)
    return 0


def _add_backend_args(p) -> None:
    p.add_argument("--backend", default="local", choices=["local", "debug", "slurm", "submitit-local"],
                   help="local: parallel subprocesses; debug: in this process; slurm: submitit job array "
                        "(pip install 'cilbench[slurm]'); submitit-local: the slurm path on this machine")
    p.add_argument("--max-parallel", type=int, help="local: runs at once (default 1; threads split between them)")
    p.add_argument("--retries", type=int, default=1,
                   help="times a failed run is started again (default 1; an interrupted run always resumes)")
    p.add_argument("--partition", help="slurm partition")
    p.add_argument("--timeout-min", type=float, help="slurm/submitit time limit per job (default 600 minutes)")
    p.add_argument("--gpus-per-run", type=int, help="slurm: GPUs per job")
    p.add_argument("--array-parallelism", type=int, help="slurm: array tasks running at once (default 16)")
    p.add_argument("--emit-sbatch", metavar="SCRIPT", help="write a plain SLURM array script + jobs.txt and stop")
    p.add_argument("--no-compare", action="store_true", help="skip the leaderboard at the end")


def _sweep(args) -> int:
    from cilbench import sweep as S

    if args.status:
        console.print(S.status_table(S.Sweep.open(Path(args.status))))
        return 0
    split = lambda items: [x for item in items or [] for x in item.split(",") if x]  # noqa: E731
    file = S.Grid.from_toml(Path(args.sweep_file)) if args.sweep_file else S.SweepFile("", [])
    grids = file.grids
    if not grids:
        if not (args.methods and args.benches):
            raise CilbenchError("a sweep needs methods and benchmarks",
                                "pass a sweep file (benchmarks/sweeps/*.toml) or --methods ... --benches ...")
        grids = [S.Grid(tuple(split(args.methods)), tuple(split(args.benches)))]
    common, scoped = S.split_sets(args.set)
    overrides = {k: v for k, v in dict(
        methods=tuple(split(args.methods)), benches=tuple(split(args.benches)),
        seeds=tuple(int(x) for x in split(args.seeds)),
        order_seeds=tuple(int(x) for x in split(args.order_seeds)),
        variants=S.parse_variants(args.variant) if args.variant else ()).items() if v}
    if args.online is not None:
        overrides["online"] = args.online
    if args.shots is not None:
        overrides["shots"] = args.shots
    grids = [dataclasses.replace(g, **overrides, sets=g.sets + common, method_sets=g.method_sets + scoped)
             for g in grids]
    out = Path(args.out) if args.out else (file.out or Path("runs"))
    specs = S.expand(grids, out)
    folder = out / "sweeps" / (args.name or file.name or S.sweep_name(grids))
    if args.dry_run:
        for spec in specs:
            console.print(f"{spec.run_id}: cilbench run {' '.join(spec.argv)}", soft_wrap=True)
        console.print(f"{len(specs)} runs; sweep folder {folder}")
        return 0
    rc = _launch_sweep(grids, specs, out, folder, args)
    if rc == 0 and file.after:
        console.print(f"every run is done; running {' '.join(file.after)}")
        return subprocess.run(list(file.after)).returncode
    return rc


def _launch_sweep(grids, specs, out: Path, folder: Path, args) -> int:
    """Run ``specs`` as the sweep ``folder`` with the backend options of ``args`` (shared by sweep and
    reproduce); 0 when every run is done."""
    from cilbench import sweep as S

    cluster = {"--partition": args.partition, "--timeout-min": args.timeout_min, "--gpus-per-run": args.gpus_per_run,
               "--array-parallelism": args.array_parallelism}
    on_cluster = args.emit_sbatch or args.backend in ("slurm", "submitit-local")
    ignored = [k for k, v in cluster.items() if v is not None] if not on_cluster else []
    if args.max_parallel is not None and (args.emit_sbatch or args.backend != "local"):
        ignored.append("--max-parallel")
    if ignored:
        raise CilbenchError(f"{', '.join(ignored)} would do nothing with --backend {args.backend}"
                            + (" --emit-sbatch" if args.emit_sbatch else ""),
                            "--max-parallel is for --backend local; --partition, --timeout-min, --gpus-per-run and "
                            "--array-parallelism for slurm, submitit-local or --emit-sbatch")
    partition, timeout = args.partition or "", args.timeout_min if args.timeout_min is not None else 600
    gpus, parallelism = args.gpus_per_run or 0, args.array_parallelism or 16
    sweep = S.Sweep.create(folder, out, grids, specs)
    if args.emit_sbatch:
        todo = sweep.pending(10**9)
        script = S.emit_sbatch(sweep, todo, Path(args.emit_sbatch), partition, int(timeout), gpus, parallelism)
        console.print(f"wrote {script} and {folder / 'jobs.txt'} ({len(todo)} runs not finished); "
                      f"submit with `sbatch {script}`, follow with `cilbench sweep --status {folder}`")
        return 0
    slurm = dict(partition=partition, timeout_min=timeout, gpus_per_run=gpus, parallelism=parallelism)
    interactive = console.is_terminal and sys.stdout.isatty()
    console.print(f"sweep {folder}: {len(specs)} runs, {len(sweep.pending(args.retries))} to run "
                  f"({args.backend})")
    try:
        with S.Watcher(sweep, console, interactive and args.backend != "debug"):
            counts = S.run_sweep(sweep, args.backend, max(1, args.max_parallel or 1), args.retries,
                                 slurm if args.backend in ("slurm", "submitit-local") else None)
    except KeyboardInterrupt:
        console.print(f"[yellow]stopped:[/] no new run starts; every run is resumable: re-run the same command "
                      f"(status: cilbench sweep --status {folder})")
        return 130
    console.print(S.status_table(sweep))
    if not args.no_compare and S.aggregate(sweep) is not None:
        console.print(f"leaderboard of the finished runs: {folder / 'leaderboard.md'}")
    bad = {k: v for k, v in counts.items() if k != "done"}
    if bad:
        console.print("[red]not finished:[/] " + ", ".join(f"{n} {k}" for k, n in bad.items())
                      + f"; logs under {folder / 'logs'}; re-run the same command to resume/retry")
        return 1
    return 0


def _reproduce(args) -> int:
    from cilbench import cost
    from cilbench import reproduce as R
    from cilbench import sweep as S

    manifest = R.load_manifest(Path(args.manifest))
    cells = R.select(manifest.cells, args.cells)
    grids = R.grids(manifest, cells, tuple(args.set))
    out = Path(args.out) if args.out else Path("runs")
    specs = {key: S.expand([grid], out) for key, grid in grids.items()}
    all_specs = S.expand(list(grids.values()), out)            # refuses two runs sharing a folder
    folder = out / "sweeps" / f"reproduce-{manifest.name}"
    if args.dry_run:
        runs = cost.finished_run_dirs([Path(p) for p in (args.calibrate or ["runs", "results/runs"])])
        rows, hours = R.plan(manifest, cells, specs, runs, args.tflops or cost.DEFAULT_TFLOPS)
        _print_rows(f"{manifest.paper}: {len(cells)} cells",
                    ("cell", "row", "benchmark", "metric", "published", "runs", "est. hours", "basis"), rows)
        runnable = sum(not R.implemented(c) for c in cells)
        console.print(f"{len(all_specs)} runs for {runnable} runnable cells ({len(cells) - runnable} not runnable); "
                      f"estimated {hours:.1f} hours in all")
        return 0
    if not args.report_only and all_specs:
        _launch_sweep(list(grids.values()), all_specs, out, folder, args)
    rows = R.compare_cells(cells, {key: [out / s.run_id for s in group] for key, group in specs.items()},
                           manifest.decimals)
    table = R.write_report(folder, manifest, rows)
    columns = ("cell", "published", "ours", "delta", "tolerance", "verdict")
    _print_rows(f"{manifest.paper}: published vs cilbench", columns, [[r[c] for c in columns] for r in table])
    counts = {v: sum(r.status == v for r in rows) for v in ("within", "outside", "missing")}
    console.print(f"{counts['within']} within tolerance, {counts['outside']} outside, {counts['missing']} without "
                  f"a finished run, {len(rows) - sum(counts.values())} not runnable in cilbench; "
                  f"{folder / 'reproduce.md'}, .csv, .png")
    return 0 if counts["outside"] == 0 and counts["missing"] == 0 else 1


def _print_rows(title: str, columns, rows: list[list[str]]) -> None:
    """A rich table on a terminal; on a pipe or log, one unwrapped line per row (long cells intact)."""
    if console.is_terminal:
        grid = Table(title=title)
        for col in columns:
            grid.add_column(col)
        for row in rows:
            grid.add_row(*(escape(str(x)) for x in row))
        console.print(grid)
        return
    console.print(title, soft_wrap=True)
    for row in [list(columns), *rows]:
        console.print(escape(" | ".join(str(x) for x in row)), soft_wrap=True, highlight=False)


def _list(args) -> int:
    from cilbench.registry import BENCHMARKS, METHODS

    for title, reg in (("methods", METHODS), ("benchmarks", BENCHMARKS)):
        table = Table(title=title, show_lines=False)
        table.add_column("name", style="bold")
        table.add_column("description")
        for e in reg.entries():
            table.add_row(e.name, e.description)
        console.print(table)
    return 0


def _compare(args) -> int:
    from cilbench.compare import find_runs, load_run, write_comparison

    roots = [Path(p) for p in args.run_dirs] or [Path(args.results or "runs")]
    if args.results and args.run_dirs:
        roots.append(Path(args.results))
    runs = [load_run(p) for p in find_runs(roots)]
    runs = [r for r in runs if (not args.bench or r.benchmark in args.bench)
            and (not args.methods or r.method in args.methods)]
    if not runs:
        raise CilbenchError(f"no run folders found in {', '.join(map(str, roots))}",
                            "run `cilbench run ...` first, or point at the folders holding summary.json")
    out = Path(args.out) if args.out else (Path(args.results) if args.results else roots[0])
    comparison = write_comparison(runs, out, args.with_published, args.split_orders)
    table, files = comparison.table, comparison.files
    for path in comparison.dropped:
        console.print(f"[yellow]note:[/] {escape(str(path))} repeats a seed and class order of a newer run; "
                      "counted once (the newer)")
    rich_table = Table(title=f"leaderboard ({len(runs)} runs; every column in {out / 'leaderboard.md'})")
    table = table[[c for c in table.columns if c in CONSOLE_COLUMNS]]
    for col in table.columns:
        text = col in ("method", "benchmark", "seeds", "status")
        rich_table.add_column(str(col), justify="left" if text else "right", no_wrap=text)
    for row in table.itertuples(index=False):
        rich_table.add_row(*map(str, row))
    console.print(rich_table)
    console.print(f"wrote {out / 'leaderboard.csv'}, {out / 'leaderboard.md'} and {len(files) - 2} plot files "
                  f"under {out / 'plots'}")
    return 0


CONSOLE_COLUMNS = ("method", "benchmark", "seeds", "orders", "n", "status", "Ā", "last acc", "forgetting (PILOT)",
                   "BWT", "added params", "train s", "eval s")


def _show(args) -> int:
    path = Path(args.run_dir)
    if not (path / "summary.json").exists():
        raise CilbenchError(f"{path} is not a run folder (no summary.json)", "pass a run folder (under runs/ by default)")
    config = path / "config.toml"
    if config.exists():
        import tomllib

        cfg = tomllib.loads(config.read_text())
        console.print(f"[bold]{cfg['method']}[/] on [bold]{cfg['benchmark']}[/]  backbone {cfg['backbone']['name']}"
                      f" ({cfg['backbone']['weights']})")
        for section in ("method_config", "run"):
            console.print(f"  {section}: " + ", ".join(f"{k}={v}" for k, v in cfg[section].items()))
    _print_summary(path)
    return 0


def _print_summary(path: Path) -> None:
    """The run's metrics, recomputed from its stored matrix and counts (as ``compare`` does)."""
    from cilbench.compare import load_record
    from cilbench.metrics import summarize
    from cilbench.results import RunDir

    s = json.loads((path / "summary.json").read_text())
    m = summarize(load_record(RunDir(path).read_events()), s["metrics"]["n_tasks"])
    tags = "".join(f" [{t}]" for t in s.get("tags", []))
    table = Table(title=f"{s['method']}{tags} on {s['benchmark']} (seed {s['seed']}, class order "
                        f"{s.get('order_seed', 1993)}) - {s['status']}")
    metrics = {"A_last": "last_acc", "Ā": "avg_inc_acc", "forget PILOT": "forgetting_pilot",
               "forget Chaudhry": "forgetting_chaudhry", "forget Avalanche": "forgetting_avalanche", "BWT": "bwt",
               "top5": "last_top5"}
    for col in ["tasks", *metrics, "added", "learn s", "eval s"]:
        table.add_column(col, justify="right")
    f = lambda v: "-" if v is None or v != v else f"{v:.2f}"  # noqa: E731  (None/NaN = undefined)
    table.add_row(f"{m['tasks_done']}/{m['n_tasks']}", *(f(m[k]) for k in metrics.values()),
                  f"{s['cost']['added']:,}", f"{s['learn_s_total']:.1f}", f"{s['eval_s_total']:.1f}")
    console.print(table)
    console.print(f"code {s.get('code_version', 'unrecorded')}, {s.get('device', '?')}, {s.get('threads', '?')} threads")
    console.print(f"files: {path}/ (summary.json, events.jsonl, accuracy_matrix.csv, environment.json, curves.png, "
                  "config.toml)")


def _pretrain(args) -> int:
    import dataclasses

    from cilbench.backbones.embedded import EMBEDDED_WEIGHTS, PretrainConfig, pretrain_tiny_vit

    overrides = {k: v for k, v in {"epochs": args.epochs, "n_classes": args.classes,
                                   "per_class": args.per_class}.items() if v is not None}
    cfg = dataclasses.replace(PretrainConfig(), **overrides)
    out = Path(args.out) if args.out else EMBEDDED_WEIGHTS
    result = pretrain_tiny_vit(cfg, out, log=console.print)
    console.print(f"wrote {out} in {result['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
