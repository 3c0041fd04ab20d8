"""`cilbench data check BENCH`: is the dataset on disk the one the benchmark's published numbers used?

Checked, each failure one line of cause and one of remedy:
- the layout (``<root>/<folder>/train/<class>/`` and ``test/``) and the class folders of both splits;
- the class count, and image counts against the published split (``train_images`` / ``test_images``
  in the benchmark file; where none is recorded, the counts are reported and said to be unchecked);
- every image decodes in full (a truncated JPEG fails here, not 200 tasks into a run);
- no file is in both train/ and test/ (same bytes, by SHA-256);
and the resolved class order is printed (folder names, as PILOT's ImageFolder indices).
Nothing is changed on disk.
"""
from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image
from cilbench.benchmark import BenchmarkSpec
from cilbench.data.folder_split import image_files, list_classes
from cilbench.protocol import class_order

SPLITS = ("train", "test")


@dataclass
class Report:
    problems: list[tuple[str, str]] = field(default_factory=list)   # (cause, remedy)
    notes: list[str] = field(default_factory=list)

    def fail(self, cause: str, remedy: str) -> None:
        self.problems.append((cause, remedy))

    @property
    def ok(self) -> bool:
        return not self.problems


def scan_file(path: str) -> tuple[str, str]:
    """(SHA-256 of the bytes, "" or why the image does not decode in full)."""
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    try:
        with Image.open(path) as im:
            im.load()   # decodes every byte: truncated files raise here
    except Exception as e:   # noqa: BLE001 -- any decoder failure is a finding, not a crash
        return digest, f"{type(e).__name__}: {e}"
    return digest, ""


def check_dataset(bench: BenchmarkSpec, data_root: Path, decode: bool = True, workers: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> Report:
    spec = bench.dataset
    report = Report()
    folder = Path(data_root).expanduser() / spec.folder
    layout = f"{folder}/train/<class>/<image> and {folder}/test/<class>/<image>"
    if not folder.is_dir():
        report.fail(f"{spec.display} not found at {folder}",
                    f"put it there as {layout} (cilbench data prepare {spec.key} --from <download>)")
        return report
    classes: dict[str, list[str]] = {}
    files: dict[str, list[tuple[str, str]]] = {}   # split -> (class, path)
    for split in SPLITS:
        if not (folder / split).is_dir():
            report.fail(f"{folder} has no {split}/ folder", f"expected {layout}")
            continue
        classes[split] = list_classes(folder / split)    # what a run lists and reads, exactly
        files[split] = [(classes[split][t], p) for p, t in image_files(folder / split, classes[split])]
    if len(classes) < 2:
        return report
    _check_classes(report, spec, classes, files)
    _check_counts(report, spec, files)
    if decode:
        _check_files(report, files, workers, progress)
    if classes["train"]:
        report.notes.append(_order_line(bench, classes["train"]))
    return report


def _check_classes(report: Report, spec, classes: dict, files: dict) -> None:
    train, test = set(classes["train"]), set(classes["test"])
    for a, b in (("train", "test"), ("test", "train")):
        missing = sorted(set(classes[a]) - set(classes[b]))
        if missing:
            report.fail(f"{len(missing)} class folder(s) of {a}/ are missing from {b}/: {_few(missing)}",
                        f"restore them in {b}/ (or re-extract the download); both splits need the same classes")
    if len(train | test) != spec.n_classes:
        report.fail(f"{len(train | test)} classes found; {spec.display} has {spec.n_classes}",
                    "the folder holds another dataset or an incomplete copy: prepare it again from the download")
    for split in SPLITS:
        per_class = defaultdict(int)
        for c, _ in files[split]:
            per_class[c] += 1
        empty = [c for c in classes[split] if per_class[c] == 0]
        if empty:
            report.fail(f"{len(empty)} class folder(s) of {split}/ hold no image: {_few(empty)}",
                        "restore their images (or re-extract the download)")


def _check_counts(report: Report, spec, files: dict) -> None:
    published = {"train": spec.train_images, "test": spec.test_images}
    for split in SPLITS:
        n = len(files[split])
        if not published[split]:
            report.notes.append(f"{split}: {n:,} images (no published count recorded for {spec.display}: unchecked)")
        elif n != published[split]:
            report.fail(f"{split}/ holds {n:,} images; the published split has {published[split]:,} "
                        f"({spec.counts_source})",
                        "images are missing or extra: prepare the dataset again from the published download")
        else:
            report.notes.append(f"{split}: {n:,} images, as published ({spec.counts_source})")


def _check_files(report: Report, files: dict, workers: int | None, progress) -> None:
    paths = [p for split in SPLITS for _, p in files[split]]
    workers = workers or max(1, len(os.sched_getaffinity(0)))
    results = []
    with ProcessPoolExecutor(workers) as pool:
        for i, result in enumerate(pool.map(scan_file, paths, chunksize=64)):
            results.append(result)
            if progress and (i + 1) % 500 == 0:
                progress(i + 1, len(paths))
    bad = [(p, err) for p, (_, err) in zip(paths, results) if err]
    for p, err in bad[:20]:
        report.fail(f"unreadable image {p}: {err}",
                    "replace it from the download, or delete it (run.bad_images = \"skip\" skips such files)")
    if len(bad) > 20:
        report.fail(f"... and {len(bad) - 20} more unreadable images", "see the lines above")
    split_of = {p: split for split in SPLITS for _, p in files[split]}
    by_digest: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for p, (digest, _) in zip(paths, results):
        by_digest[digest][split_of[p]].append(p)
    shared = [d for d in by_digest.values() if d["train"] and d["test"]]
    for d in shared[:10]:
        report.fail(f"the same file is in train/ and test/: {d['train'][0]} = {d['test'][0]}",
                    "a test image seen in training inflates accuracy: remove the test copy or re-split")
    if len(shared) > 10:
        report.fail(f"... and {len(shared) - 10} more files in both train/ and test/", "see the lines above")
    report.notes.append(f"decoded {len(paths):,} images: {len(bad)} unreadable, "
                        f"{len(shared)} shared by train/ and test/")


def _order_line(bench: BenchmarkSpec, names: list[str]) -> str:
    natural = bench.class_order == "natural"
    order = class_order(len(names), bench.order_seed, shuffle=not natural)
    rule = "natural folder order" if natural else f"seed {bench.order_seed} (numpy permutation)"
    listed = ", ".join(f"{i}:{names[i]}" for i in order)
    return f"class order of {bench.name}, {rule}; label: index:folder\n  {listed}"


def _few(names: list[str], k: int = 5) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "")
