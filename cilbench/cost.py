"""How long a run will take, before it is launched: the cost model behind `cilbench reproduce --dry-run`.

A run's work is counted in images: training images × epochs (each training image is trained on in
the task that owns it, once per epoch) and evaluated images (after each evaluated task, every test
image of the seen classes). Two ways to price an image:

- **calibrated**: from finished runs of the same method and backbone on the same kind of device,
  read from their recorded per-task timings (``events.jsonl``): seconds per training image-epoch =
  sum of ``learn_s`` / sum of image-epochs, seconds per evaluated image = sum of ``eval_s`` / sum of
  evaluated images. A run of the very benchmark is the best calibration; any benchmark will do.
- **FLOPs** (no such run): a ViT forward costs ``flops_per_image`` (patch embedding, attention and
  MLP of every block), a training image-epoch three forwards (forward + backward), an evaluation one,
  at a stated device throughput (``tflops``, effective, default 50 TFLOP/s). Method overheads beyond
  the backbone (CaRE's experts, prompts, APER's second backbone) are not counted: a lower bound.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

DEFAULT_TFLOPS = 50.0   # effective TFLOP/s assumed for a GPU when no calibration run exists


@dataclass(frozen=True)
class Workload:
    train_image_epochs: float    # training images x epochs (a forward-only pass counts 1/3; see workload)
    eval_images: float           # sum over evaluated tasks of the seen classes' test images
    known: bool = True           # False: the dataset's image counts are not recorded


@dataclass(frozen=True)
class Estimate:
    seconds: float | None
    basis: str                   # how it was made, e.g. "calibrated on 2 runs (cuda)" or "FLOPs at 50 TFLOP/s"

    @property
    def hours(self) -> float | None:
        return None if self.seconds is None else self.seconds / 3600


def images_per_class(dataset) -> tuple[float, float] | None:
    """(train, test) images per class of a dataset spec, from its recorded counts; None if unknown."""
    if dataset.source == "synthetic":
        return float(dataset.train_per_class), float(dataset.test_per_class)
    if dataset.train_images and dataset.test_images:
        return dataset.train_images / dataset.n_classes, dataset.test_images / dataset.n_classes
    return None


def workload(bench, method_cls: type, method_cfg: Any, shots: int = 0, eval_every: int = 1) -> Workload:
    """Training as the method counts it (``Method.training_image_epochs``: e.g. APER trains on task 0
    only, SimpleCIL only passes each image once) and evaluation after every evaluated task."""
    per_class = images_per_class(bench.dataset)
    if per_class is None:
        return Workload(0.0, 0.0, known=False)
    train, test = per_class
    train = min(train, shots) if shots else train
    n_tasks = len(bench.splits)
    units = method_cls.training_image_epochs(method_cfg, [train * len(split) for split in bench.splits])
    if method_cls.caches_test_features:   # each test image's features once, when its classes arrive
        return Workload(units, test * bench.n_classes)
    evaluated = [t for t in range(n_tasks) if (t + 1) % eval_every == 0 or t == n_tasks - 1]
    return Workload(units, test * sum(bench.splits[t].stop for t in evaluated))


def vit_flops_per_image(backbone_name: str) -> float:
    """Forward FLOPs (2 x multiply-adds) of a plain ViT: patch embedding + L blocks of attention
    projections (4 N d^2), attention maps (2 N^2 d) and MLP (2 N d h)."""
    img, patch, dim, depth, hidden = _vit_shape(backbone_name)
    tokens = (img // patch) ** 2 + 1
    block = 4 * tokens * dim ** 2 + 2 * tokens ** 2 * dim + 2 * tokens * dim * hidden
    embed = (img // patch) ** 2 * 3 * patch ** 2 * dim
    return 2.0 * (depth * block + embed)


@lru_cache(maxsize=8)
def _vit_shape(backbone_name: str) -> tuple[int, int, int, int, int]:
    from cilbench.backbones.loader import EMBEDDED

    if backbone_name == EMBEDDED:
        from cilbench.backbones.embedded import build_tiny_vit
        vit = build_tiny_vit()
    else:
        import timm
        vit = timm.create_model(backbone_name, pretrained=False, num_classes=0)
    img = vit.patch_embed.img_size[0]
    patch = vit.patch_embed.patch_size[0]
    return img, patch, vit.embed_dim, len(vit.blocks), vit.blocks[0].mlp.fc1.out_features


@dataclass(frozen=True)
class Calibration:
    """Seconds per training image-epoch and per evaluated image, from finished runs."""

    learn_s_per_image_epoch: float
    eval_s_per_image: float
    runs: int


def calibrate(run_dirs: list[Path], method: str, backbone: str, device: str,
              benchmark: str | None = None) -> Calibration | None:
    """From finished runs of ``method`` on ``backbone`` whose recorded device starts with ``device``;
    only those of ``benchmark`` when there are any (the same images, the same per-image costs)."""
    from cilbench.benchmark import get_benchmark
    from cilbench.registry import METHODS

    found = []   # (benchmark, learn s, eval s, workload)
    for folder in run_dirs:
        summary, config = _read(folder)
        if summary is None or summary.get("status") != "finished" or summary.get("method") != method:
            continue
        if config.get("backbone", {}).get("name") != backbone or not str(summary.get("device", "")).startswith(device):
            continue
        try:
            bench = get_benchmark(config["benchmark"])
            method_cls = METHODS.get(method)
            cfg = method_cls.Config(**config.get("method_config", {}))
        except Exception:   # noqa: BLE001 -- a run of a benchmark or setting this code no longer has
            continue
        run = config.get("run", {})
        work = workload(bench, method_cls, cfg, run.get("shots", 0), run.get("eval_every", 1))
        if work.known:
            found.append((bench.name, summary["learn_s_total"], summary["eval_s_total"], work))
    if any(name == benchmark for name, *_ in found):
        found = [f for f in found if f[0] == benchmark]
    if not found:
        return None
    learn, eval_ = sum(f[1] for f in found), sum(f[2] for f in found)
    image_epochs, images = sum(f[3].train_image_epochs for f in found), sum(f[3].eval_images for f in found)
    return Calibration(learn / max(image_epochs, 1.0), eval_ / max(images, 1.0), len(found))


def estimate(work: Workload, calibration: Calibration | None, backbone: str, device: str,
             tflops: float = DEFAULT_TFLOPS) -> Estimate:
    if not work.known:
        return Estimate(None, "unknown: the dataset's image counts are not recorded")
    if calibration is not None:
        seconds = (work.train_image_epochs * calibration.learn_s_per_image_epoch
                   + work.eval_images * calibration.eval_s_per_image)
        return Estimate(seconds, f"calibrated on {calibration.runs} run(s) ({device})")
    flops = vit_flops_per_image(backbone) * (3 * work.train_image_epochs + work.eval_images)
    return Estimate(flops / (tflops * 1e12), f"FLOPs at {tflops:g} TFLOP/s (backbone only)")


def estimate_run(config: dict, calibration_runs: list[Path], tflops: float = DEFAULT_TFLOPS) -> Estimate:
    """The estimate for a run from the config it would record (``ResolvedRun.as_toml_dict``)."""
    from cilbench.benchmark import get_benchmark
    from cilbench.registry import METHODS

    bench, method_cls = get_benchmark(config["benchmark"]), METHODS.get(config["method"])
    run, backbone = config["run"], config["backbone"]["name"]
    work = workload(bench, method_cls, method_cls.Config(**config["method_config"]), run.get("shots", 0),
                    run.get("eval_every", 1))
    calibration = calibrate(calibration_runs, config["method"], backbone, run["device"], bench.name)
    return estimate(work, calibration, backbone, run["device"], tflops)


def finished_run_dirs(roots: list[Path]) -> list[Path]:
    """Every run folder (a folder with a summary.json) under ``roots``."""
    return sorted({p.parent for root in roots if root.exists() for p in root.rglob("summary.json")})


def _read(folder: Path) -> tuple[dict | None, dict]:
    try:
        summary = json.loads((folder / "summary.json").read_text())
        config = tomllib.loads((folder / "config.toml").read_text())
    except (OSError, ValueError):
        return None, {}
    return summary, config
