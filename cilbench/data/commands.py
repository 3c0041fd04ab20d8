"""The `cilbench data check | prepare` commands: argument handling and printing (the work is in
``check`` and ``prepare``)."""
from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from cilbench.benchmark import BENCHMARKS, DatasetSpec, get_benchmark, load_benchmark_files
from cilbench.config import load_user_config
from cilbench.errors import DataError, suggest


def data_root(flag: str | None, config_path: str | None) -> Path:
    """--data-root, else $CILBENCH_DATA, else cilbench.toml [data] root (as `cilbench run` reads it)."""
    root = flag or os.environ.get("CILBENCH_DATA") or load_user_config(config_path).get("data", {}).get("root")
    if not root:
        raise DataError("no data root given", "pass --data-root, set CILBENCH_DATA, or [data] root in cilbench.toml")
    return Path(root).expanduser()


def check_command(args, console: Console) -> int:
    from cilbench.data.check import Report, check_dataset

    load_benchmark_files()
    bench = get_benchmark(args.bench)
    spec = bench.dataset
    if spec.source == "synthetic":
        console.print(f"{bench.name}: synthetic images, generated on first use; nothing on disk to check")
        return 0
    root = data_root(args.data_root, args.config)
    if spec.source == "cifar100":
        report = _check_cifar(spec, root)
    else:
        progress = (lambda i, n: console.print(f"  decoded {i:,}/{n:,}", highlight=False)) if args.verbose else None
        report: Report = check_dataset(bench, root, decode=not args.no_decode, workers=args.workers,
                                       progress=progress)
    for note in report.notes:
        console.print(escape(note), highlight=False, soft_wrap=True)
    for cause, remedy in report.problems:
        console.print(f"[bold red]mismatch:[/] {escape(cause)}", soft_wrap=True)
        console.print(f"  [yellow]->[/] {escape(remedy)}", soft_wrap=True)
    verdict = "[green]matches the published dataset[/]" if report.ok else f"[red]{len(report.problems)} problem(s)[/]"
    console.print(f"{spec.display} at {escape(str(root / spec.folder))}: {verdict}")
    return 0 if report.ok else 1


def _check_cifar(spec: DatasetSpec, root: Path):
    from torchvision.datasets import CIFAR100

    from cilbench.data.check import Report

    report = Report()
    for train, published in ((True, spec.train_images), (False, spec.test_images)):
        split = "train" if train else "test"
        try:
            n = len(CIFAR100(str(root / spec.folder), train=train, download=False))
        except RuntimeError as e:
            report.fail(f"CIFAR-100 {split} not found under {root / spec.folder} ({e})",
                        f"place the python version (cifar-100-python/) there; data: {spec.published}")
            continue
        if published and n != published:
            report.fail(f"CIFAR-100 {split} has {n:,} images; published {published:,}", "download it again")
        else:
            report.notes.append(f"{split}: {n:,} images, as published")
    return report


def prepare_command(args, console: Console) -> int:
    from cilbench.data.prepare import prepare

    load_benchmark_files()
    spec = _dataset(args.dataset)
    if spec.source != "imagefolder":
        raise DataError(f"{spec.display} is read from its {spec.source} files as they are; nothing to prepare",
                        f"place them as {spec.published}")
    prepare(spec, Path(args.source), data_root(args.data_root, args.config), verify=not args.no_verify,
            log=lambda m: console.print(escape(m), highlight=False))
    return 0


def _dataset(name: str) -> DatasetSpec:
    """A dataset by its key (``imagenet-r``) or by any benchmark that uses it (``inr-10``)."""
    specs = {b().dataset.key: b().dataset for b in (BENCHMARKS.get(n) for n in BENCHMARKS.names())}
    if name in specs:
        return specs[name]
    if name in BENCHMARKS.names():
        return get_benchmark(name).dataset
    raise DataError(f"unknown dataset {name!r}", suggest(name, sorted(specs)))
