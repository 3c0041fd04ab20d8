"""Input pipeline throughput: JPEG decoding vs the decoded-image cache, beside the models' forward speed.

    python benchmarks/perf/input_pipeline.py [--workers 1 2] [--no-vitb] [--out runs/perf/input_pipeline]

Writes a JPEG ImageFolder at 224-500 px (synthetic renders resized and noised, saved at quality 90),
then times, on this machine and in this one process, images per second delivered as batches by the
real loading path (``ClassIncrementalData`` views over ``FolderSplit``):
- evaluation input (test transform: resize 256 bicubic + centre crop 224): decoded from the JPEGs by
  N DataLoader workers, and read from the decoded cache (built once; its build time is reported);
- training input (RandomResizedCrop 224 + flip): decoded from the JPEGs by N workers, and cut by
  batched ``roi_align`` from the training cache (``run.train_cache = 256``);
- the forward pass (no grad, fp32) of the embedded tiny ViT (32 px) and of a ViT-B/16 (224 px,
  random weights: the speed does not depend on them).
Batches leave the loader as uint8; the float conversion happens where the model runs (on a GPU,
on the device), and its CPU cost is shown in its own column. Prints a Markdown table (README).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from cilbench.benchmark import DatasetSpec
from cilbench.data.folder_split import FolderLoading
from cilbench.data.sources import load_splits
from cilbench.data.stream import ClassIncrementalData
from cilbench.data.jpeg_folder import write_jpeg_folder
from cilbench.protocol import make_splits

SPEC = DatasetSpec(key="jpeg-perf", display="JPEG 224-500 px", source="imagefolder", folder="jpeg-perf",
                   n_classes=20, image_size=224)


def rate(views, convert: bool = False, passes: int = 3) -> float:
    """Images per second of the best of ``passes`` passes over each view: the steady state of a run
    that reads its data again and again (workers started, files and cache pages in memory)."""
    best = 0.0
    for _ in range(passes):
        n, start = 0, time.perf_counter()
        for view in views():
            for batch in view:
                if convert:
                    batch.images  # noqa: B018 -- the uint8 -> float conversion a CPU model pays
                n += len(batch.labels)
        best = max(best, n / (time.perf_counter() - start))
    return best


def data_for(root: Path, cache: Path, **loading) -> ClassIncrementalData:
    train, test = load_splits(SPEC, root, loading=FolderLoading(cache_dir=cache, **loading))
    return ClassIncrementalData(train, test, SPEC.n_classes, make_splits(SPEC.n_classes, 0, SPEC.n_classes), 1993)


def forward_rate(model: torch.nn.Module, size: int, batch: int, reps: int) -> float:
    x = torch.rand(batch, 3, size, size)
    with torch.no_grad():
        model(x)   # warm-up
        start = time.perf_counter()
        for _ in range(reps):
            model(x)
    return batch * reps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=40, help="images per class and split (20 classes)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=64, help="training batch size")
    ap.add_argument("--eval-batch-size", type=int, default=256, help="evaluation batch size (run.eval_batch_size)")
    ap.add_argument("--no-vitb", action="store_true", help="skip the ViT-B/16 forward timing")
    ap.add_argument("--out", default="runs/perf/input_pipeline")
    args = ap.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    work = Path(tempfile.mkdtemp(prefix="cilbench-input-"))
    try:
        write_jpeg_folder(work / "data" / SPEC.folder, SPEC.n_classes, args.per_class, args.per_class,
                          sizes=(224, 500), render=64, noise=8.0)
        n_files = 2 * SPEC.n_classes * args.per_class
        rows, bs = [], args.batch_size
        n = SPEC.n_classes

        def test_views(data):   # evaluation batches at cilbench's run.eval_batch_size
            return lambda: [data.test_view(n, args.eval_batch_size)]

        def train_views(data):
            return lambda: [data.training.train_view(0, n, bs, shuffle=True, augment=True, seed=0)]
        for w in args.workers:
            data = data_for(work / "data", work / "cache", workers=w, persistent_workers=True)
            rows.append(("evaluation", f"JPEG decode + resize/crop, {w} worker(s)", rate(test_views(data)),
                         rate(test_views(data), convert=True)))
            rows.append(("training", f"JPEG decode + RandomResizedCrop/flip, {w} worker(s)", rate(train_views(data)), None))
        cached = data_for(work / "data", work / "cache", workers=max(args.workers), decode_cache=True, train_cache=256)
        start = time.perf_counter()
        cached.test._cache(0)   # noqa: SLF001 -- build the test cache here, to time the build on its own
        build_s = time.perf_counter() - start
        rows.append(("evaluation", "decoded cache (uint8 memmap)", rate(test_views(cached)),
                     rate(test_views(cached), convert=True)))
        rows.append(("training", "training cache 256 + roi_align crop/flip (CPU)", rate(train_views(cached)), None))

        from cilbench.backbones.embedded import build_tiny_vit
        tiny = build_tiny_vit().eval()
        rows.append(("model", "embedded tiny ViT forward (32 px, fp32)", forward_rate(tiny, 32, 256, 20), None))
        if not args.no_vitb:
            import timm
            vitb = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
            rows.append(("model", "ViT-B/16 forward (224 px, fp32)", forward_rate(vitb, 224, 16, 3), None))
        cache_bytes = sum(p.stat().st_size for p in (work / "cache").rglob("*.npy"))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    jpeg = max(r[2] for r in rows if r[0] == "evaluation" and "JPEG" in r[1])
    cache = next(r[2] for r in rows if r[1].startswith("decoded cache"))
    cores = len(os.sched_getaffinity(0))
    lines = ["| stage | path | images/s | with float conversion |", "|---|---|---|---|"]
    lines += [f"| {stage} | {path} | {r:,.0f} | {'' if c is None else f'{c:,.0f}'} |" for stage, path, r, c in rows]
    lines.append(f"\n{n_files} JPEGs (224-500 px), {cores} cores, torch {torch.__version__}, best of 3 passes, batches of "
                 f"{args.eval_batch_size} (evaluation) and {args.batch_size} (training). "
                 f"Evaluation input from the cache: **{cache / jpeg:.1f}x** the best JPEG rate; test cache built "
                 f"in {build_s:.1f} s, caches {cache_bytes / 2**20:.0f} MiB. The training cache's crop runs on "
                 f"the run's device; on CPU cores it costs more than decoding.")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "input_pipeline.md").write_text(table + "\n")
    (out / "input_pipeline.json").write_text(json.dumps(
        {"rows": [{"stage": s, "path": p, "images_per_s": r, "with_float": c} for s, p, r, c in rows],
         "cache_over_jpeg": cache / jpeg, "cores": cores, "files": n_files}, indent=1))


if __name__ == "__main__":
    main()
