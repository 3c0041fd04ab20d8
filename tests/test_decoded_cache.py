"""The decoded-image cache and the ImageFolder loading path, on JPEG datasets written here."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cilbench.benchmark import DatasetSpec
from cilbench.data.folder_split import FolderLoading
from cilbench.data.jpeg_folder import write_jpeg_folder
from cilbench.data.sources import load_splits
from cilbench.data.stream import ClassIncrementalData
from cilbench.data.transforms import AugmentConfig, random_resized_crop
from cilbench.protocol import make_splits

BENCH = """
[dataset.jpeg100]
display = "JPEG synthetic, 100 classes"
source = "imagefolder"
folder = "jpeg100"
n_classes = 100
image_size = 32
train_scale = [0.35, 1.0]

[benchmark.jpeg-50]
description = "100 JPEG classes, B0 Inc2: 50 tasks"
dataset = "jpeg100"
increment = 2
"""
SPEC = DatasetSpec(key="jpeg100", display="JPEG", source="imagefolder", folder="jpeg100", n_classes=100,
                   image_size=32, train_scale=(0.35, 1.0))


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jpeg")
    write_jpeg_folder(root / "data" / "jpeg100", 100, 4, 3)
    (root / "bench").mkdir()
    (root / "bench" / "jpeg.toml").write_text(BENCH)
    return root


def run(jpeg_root: Path, out: Path, name: str, method: str = "simplecil", sets=(), kill_at: str | None = None,
        cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CILBENCH_BENCHMARKS": f"{jpeg_root / 'bench'}{os.pathsep}{os.environ['CILBENCH_BENCHMARKS']}",
           "CILBENCH_CACHE": str(cache or out / "cache")}
    env.pop("CILBENCH_KILL_AT", None)
    if kill_at:
        env["CILBENCH_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "cilbench.cli", "run", "--method", method, "--bench", "jpeg-50",
           "--data-root", str(jpeg_root / "data"), "--out", str(out), "--name", name,
           *[a for s in ("run.threads=1", *sets) for a in ("--set", s)]]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def hits(run_dir: Path) -> np.ndarray:
    return pd.read_csv(run_dir / "top1_hits.csv", index_col=0).to_numpy()


def test_a_50_task_jpeg_run_reads_the_cache_gives_the_uncached_matrix_and_resumes_after_a_kill(jpeg_root, tmp_path):
    cache = tmp_path / "cache"
    plain = run(jpeg_root, tmp_path, "plain", sets=["run.decode_cache=false"], cache=cache)
    assert plain.returncode == 0, plain.stderr
    assert not (cache / "decoded").exists()
    killed = run(jpeg_root, tmp_path, "cached", kill_at="test:30", cache=cache)   # at task 30 of 50 (one test batch a task)
    assert killed.returncode == -9
    built = sorted((cache / "decoded").glob("*.pixels.npy"))
    assert len(built) == 2   # the test transform of train/ (simplecil's prototypes) and of test/
    mtimes = [p.stat().st_mtime_ns for p in built]
    resumed = run(jpeg_root, tmp_path, "cached", cache=cache)
    assert resumed.returncode == 0, resumed.stderr
    log = (tmp_path / "cached" / "log.txt").read_text()
    assert "resumed after task" in log and log.count("built in") == 2 and log.count("reused") == 2
    assert [p.stat().st_mtime_ns for p in sorted((cache / "decoded").glob("*.pixels.npy"))] == mtimes
    assert hits(tmp_path / "cached").shape == (50, 50)
    np.testing.assert_array_equal(hits(tmp_path / "cached"), hits(tmp_path / "plain"))


def test_a_trained_method_gives_the_same_matrix_with_and_without_the_cache(jpeg_root, tmp_path):
    sets = ["method.epochs=1", "run.num_workers=2"]
    a = run(jpeg_root, tmp_path, "a", "finetune", sets=[*sets, "run.decode_cache=false"])
    b = run(jpeg_root, tmp_path, "b", "finetune", sets=sets)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    np.testing.assert_array_equal(hits(tmp_path / "a"), hits(tmp_path / "b"))


def _data(jpeg_root: Path, **loading) -> ClassIncrementalData:
    train, test = load_splits(SPEC, jpeg_root / "data", loading=FolderLoading(**loading))
    return ClassIncrementalData(train, test, 100, make_splits(100, 0, 50), 1993)


def test_training_crops_are_the_same_for_any_worker_count(jpeg_root):
    """Crops are drawn per sample from the pass's generator, so workers (and resumes) cannot change them."""
    def first_pass(workers: int) -> torch.Tensor:
        view = _data(jpeg_root, workers=workers).training.train_view(0, 10, 8, shuffle=True, augment=True, seed=3)
        return torch.cat([b.images for b in view])
    zero, two = first_pass(0), first_pass(2)
    assert zero.shape == (40, 3, 32, 32)
    torch.testing.assert_close(zero, two, rtol=0, atol=0)
    view = _data(jpeg_root).training.train_view(0, 10, 8, shuffle=True, augment=True, seed=3)
    assert not torch.equal(torch.cat([b.images for b in view]), torch.cat([b.images for b in view]))  # 2 passes


def test_persistent_workers_serve_pass_after_pass_and_a_nested_read(jpeg_root):
    data = _data(jpeg_root, workers=2, persistent_workers=True)
    view = data.training.train_view(0, 10, 8, shuffle=False, augment=False, seed=0)
    reference = torch.cat([b.images for b in _data(jpeg_root).training.train_view(0, 10, 8, False, False, 0)])
    for _ in range(3):
        torch.testing.assert_close(torch.cat([b.images for b in view]), reference, rtol=0, atol=0)
    outer = []
    for b in view:   # a read inside a read gets a loader of its own
        outer.append(b.images)
        torch.testing.assert_close(torch.cat([c.images for c in view]), reference, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(outer), reference, rtol=0, atol=0)


def test_the_training_cache_crops_in_the_original_images_pixels():
    """A 10 x 40 (h x w) horizontal ramp cached squeezed to 20 x 20: a square crop of a quarter of the
    original's area is 10 x 10 original pixels, the full height and a quarter of the width, so the
    output spans a quarter of the ramp's range left to right (by hand: 10/40 of it)."""
    ramp = torch.linspace(0, 1, 20).expand(1, 3, 20, 20).contiguous()
    cfg = AugmentConfig(size=16, scale=(0.25, 0.25), ratio=(1.0, 1.0), flip=False)
    out = random_resized_crop(ramp.repeat(64, 1, 1, 1), cfg, torch.Generator().manual_seed(0),
                              torch.tensor([[10, 40]]).repeat(64, 1))
    span = out[:, 0, 8, -1] - out[:, 0, 8, 0]
    ramp_step = 1 / 19   # one pixel of the 20-wide copy; the crop covers 5 of its 20 columns
    assert torch.all((span > 5 * ramp_step * 0.7) & (span < 5 * ramp_step * 1.01))
    vertical = out[:, 0, :, 4]
    assert torch.allclose(vertical, vertical[:, :1].expand_as(vertical))   # full height of a ramp in x only


def test_a_training_cache_run_is_deterministic_and_its_setting_is_recorded(jpeg_root, tmp_path):
    a = run(jpeg_root, tmp_path, "a", "finetune", sets=["method.epochs=1", "run.train_cache=40"])
    b = run(jpeg_root, tmp_path, "b", "finetune", sets=["method.epochs=1", "run.train_cache=40"])
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    np.testing.assert_array_equal(hits(tmp_path / "a"), hits(tmp_path / "b"))
    assert "train_cache = 40" in (tmp_path / "a" / "config.toml").read_text()
    assert "(train cache)" in (tmp_path / "a" / "log.txt").read_text()


BUILD = """
import sys
from pathlib import Path
from cilbench.data.folder_split import FolderLoading
from cilbench.data.sources import load_splits
from tests.test_decoded_cache import SPEC
import numpy as np
_, test = load_splits(SPEC, Path(sys.argv[1]), loading=FolderLoading(decode_cache=True, cache_dir=Path(sys.argv[2]),
                                                                      log=print))
pixels = np.concatenate([p.numpy() for p, _ in test.read(np.arange(len(test)), 64, False, None)])
np.save(sys.argv[3], pixels)
"""


def test_concurrent_builds_make_one_cache_and_a_build_cut_short_is_built_again(jpeg_root, tmp_path):
    args = [str(jpeg_root / "data"), str(tmp_path / "cache")]
    env = {k: v for k, v in os.environ.items() if k != "CILBENCH_KILL_AT"}
    cut = subprocess.run([sys.executable, "-c", BUILD, *args, str(tmp_path / "x.npy")],
                         env={**env, "CILBENCH_KILL_AT": "cache:1"}, capture_output=True, text=True, timeout=300)
    assert cut.returncode == -9 and not list((tmp_path / "cache" / "decoded").glob("*.json"))
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, *args, str(tmp_path / f"{i}.npy")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    said = " ".join(o for o, _ in outs)
    assert said.count("built in") == 1 and said.count("reused") == 1
    uncached = np.concatenate([p.numpy() for p, _ in load_splits(SPEC, jpeg_root / "data")[1].read(
        np.arange(300), 64, False, None)])
    for i in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"{i}.npy"), uncached)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: needs a GPU")


@CUDA
def test_uint8_batches_reach_cuda_channels_last_and_convert_there_as_on_the_cpu():
    from cilbench.data.base import Batch

    batch = Batch(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), torch.zeros(4, dtype=torch.long),
                  torch.arange(4), "x")
    moved = batch.to("cuda")
    assert moved.pixels.dtype == torch.uint8 and moved.pixels.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(moved.images.cpu(), batch.images, rtol=0, atol=0)


@CUDA
def test_training_cache_crops_cut_on_cuda_match_the_cpu_crops():
    images = torch.rand(16, 3, 40, 40)
    sizes = torch.randint(30, 90, (16, 2))
    cfg = AugmentConfig(size=24)
    cpu = random_resized_crop(images, cfg, torch.Generator().manual_seed(1), sizes)
    gpu = random_resized_crop(images.cuda(), cfg, torch.Generator().manual_seed(1), sizes)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-5)


def test_a_training_cache_on_in_memory_data_is_refused():
    from cilbench.errors import ConfigError
    from cilbench.runner import RunRequest, resolve

    with pytest.raises(ConfigError, match="train_cache"):
        resolve(RunRequest("finetune", "tiny-3", sets=["run.train_cache=64"]))
