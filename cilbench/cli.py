"""`cilbench run | list | show | pretrain`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cilbench.errors import CilbenchError

console = Console()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cilbench", description="Class-incremental learning benchmark suite")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run one method on one benchmark")
    p.add_argument("--method", required=True)
    p.add_argument("--bench", required=True)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--data-root")
    p.add_argument("--out", help="output root (default: results/)")
    p.add_argument("--name", help="run folder name (default: <bench>__<method>__s<seed>)")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--config", help="cilbench.toml to read (default: ./cilbench.toml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a setting, e.g. method.lr=0.01, run.threads=2, backbone.weights=none")
    p.add_argument("--force", action="store_true", help="start over even if the run folder holds a run")

    sub.add_parser("list", help="registered methods and benchmarks")

    p = sub.add_parser("show", help="summary of one run folder")
    p.add_argument("run_dir")

    p = sub.add_parser("pretrain", help="(re)build the embedded tiny ViT weights")
    p.add_argument("--out", default=None)
    p.add_argument("--epochs", type=int)
    p.add_argument("--classes", type=int)
    p.add_argument("--per-class", type=int)

    args = parser.parse_args(argv)
    try:
        return {"run": _run, "list": _list, "show": _show, "pretrain": _pretrain}[args.command](args)
    except CilbenchError as e:
        if args.debug:
            raise
        console.print(f"[bold red]error:[/] {e.cause}")
        if e.remedy:
            console.print(f"  [yellow]->[/] {e.remedy}")
        return 2


def _run(args) -> int:
    from cilbench.progress import ConsoleReporter
    from cilbench.runner import RunRequest, execute, resolve

    req = RunRequest(method=args.method, bench=args.bench, seed=args.seed, device=args.device,
                     data_root=args.data_root, out=args.out, name=args.name, sets=args.set,
                     config_path=args.config, force=args.force, eval_every=args.eval_every)
    resolved = resolve(req)
    title = f"{resolved.method_cls.name} on {resolved.bench.name}"
    rd = execute(resolved, lambda n: ConsoleReporter(n, title), force=args.force)
    _print_summary(rd.path)
    return 0


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


def _show(args) -> int:
    path = Path(args.run_dir)
    if not (path / "summary.json").exists():
        raise CilbenchError(f"{path} is not a run folder (no summary.json)", "pass a folder under results/")
    _print_summary(path)
    return 0


def _print_summary(path: Path) -> None:
    s = json.loads((path / "summary.json").read_text())
    m = s["metrics"]
    table = Table(title=f"{s['method']} on {s['benchmark']} (seed {s['seed']}) - {s['status']}")
    for col in ("tasks", "last acc", "avg inc acc", "forgetting", "BWT", "last top-5", "added params",
                "learn s", "eval s"):
        table.add_column(col, justify="right")
    f = lambda v: "-" if v is None or v != v else f"{v:.2f}"  # noqa: E731
    table.add_row(f"{m['tasks_done']}/{m['n_tasks']}", f(m["last_acc"]), f(m["avg_inc_acc"]),
                  f(m["forgetting"]), f(m["bwt"]), f(m["last_top5"]), f"{s['cost']['added']:,}",
                  f"{s['learn_s_total']:.1f}", f"{s['eval_s_total']:.1f}")
    console.print(table)
    console.print(f"files: {path}/ (summary.json, events.jsonl, accuracy_matrix.csv, curves.png, config.toml)")


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
