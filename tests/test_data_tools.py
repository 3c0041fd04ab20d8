"""`cilbench data check` and `cilbench data prepare` on datasets, archives and parquet shards made here."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cilbench.cli import main
from cilbench.data.jpeg_folder import write_jpeg_folder

BENCH = """
[dataset.toyjpeg]
display = "Toy JPEG"
source = "imagefolder"
folder = "toyjpeg"
n_classes = 100
image_size = 32
train_images = 200
test_images = 100
counts_source = "written by the test"
archive = "toyjpeg.zip"
archive_md5 = "{md5}"

[benchmark.toyjpeg-10]
dataset = "toyjpeg"
increment = 10

[benchmark.toyjpeg-natural]
dataset = "toyjpeg"
increment = 10
class_order = "natural"
"""


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    """A 100-class JPEG dataset (2 train / 1 test image per class) and its zip, wrapped in folders and
    with archive junk, as the PILOT zips come (``toy_data / "toyjpeg.zip"``)."""
    root = tmp_path_factory.mktemp("data")
    write_jpeg_folder(root / "toyjpeg", 100, 2, 1)
    files = {f"vtab-cil/vtab/{k}": v for k, v in tree(root / "toyjpeg").items()}
    files["__MACOSX/x/train/c00/._0.jpg"] = b"resource fork"          # never extracted
    files["vtab-cil/vtab/README.txt"] = b"not an image"
    with zipfile.ZipFile(root / "toyjpeg.zip", "w") as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), data)
    return root


@pytest.fixture
def toy_bench(tmp_path, monkeypatch, bench_dir, toy_data):
    """The benchmark file of the toy dataset; its archive md5 is the published prefix of the zip's."""
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    md5 = hashlib.md5((toy_data / "toyjpeg.zip").read_bytes()).hexdigest()[:8]
    (folder / "toy.toml").write_text(BENCH.format(md5=md5))
    monkeypatch.setenv("CILBENCH_BENCHMARKS", f"{folder}{os.pathsep}{bench_dir}")


def check(capsys, *args) -> tuple[int, str]:
    rc = main(["data", "check", *args])
    return rc, capsys.readouterr().out


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and not p.name.startswith(".")}


def test_check_passes_on_the_published_layout_and_prints_the_seed_1993_order(toy_bench, toy_data, capsys):
    rc, out = check(capsys, "toyjpeg-10", "--data-root", str(toy_data), "--workers", "2")
    assert rc == 0, out
    assert "train: 200 images, as published" in out and "test: 100 images, as published" in out
    assert "0 unreadable, 0 shared" in out
    # pilot.md §1.3: the seed-1993 order of 100 classes (CIFAR-100's) starts 68, 56, 78, 8, 23
    assert "label: index:folder\n  68:c68, 56:c56, 78:c78, 8:c08, 23:c23," in out
    rc, out = check(capsys, "toyjpeg-natural", "--data-root", str(toy_data), "--no-decode")
    assert rc == 0 and "natural folder order" in out and "  0:c00, 1:c01, 2:c02," in out


def test_check_names_a_truncated_image_a_missing_class_a_wrong_count_and_a_duplicate(
        toy_bench, toy_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(toy_data, data)
    root = data / "toyjpeg"
    truncated = root / "train" / "c05" / sorted(os.listdir(root / "train" / "c05"))[0]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    shutil.rmtree(root / "test" / "c07")                                     # a missing class (and 99 test images)
    leaked = sorted((root / "train" / "c09").iterdir())[0]
    shutil.copy(leaked, root / "test" / "c09" / "leaked.jpg")                 # a train file in test/ (back to 100)
    (root / "train" / "c11" / sorted(os.listdir(root / "train" / "c11"))[0]).unlink()   # 199 train images
    rc, out = check(capsys, "toyjpeg-10", "--data-root", str(data), "--workers", "2")
    assert rc == 1
    lines = out.splitlines()
    mismatches = [i for i, line in enumerate(lines) if line.startswith("mismatch:")]
    assert all(lines[i + 1].lstrip().startswith("->") for i in mismatches)   # one line of cause, one of remedy
    text = " ".join(out.split())
    assert f"unreadable image {truncated}" in text and "truncated" in text
    assert "1 class folder(s) of train/ are missing from test/: c07" in text
    assert "train/ holds 199 images; the published split has 200" in text
    assert "the same file is in train/ and test/" in text and "leaked.jpg" in text
    assert len(mismatches) == 4


def test_check_of_a_missing_dataset_says_where_to_put_it(toy_bench, tmp_path, capsys):
    rc, out = check(capsys, "toyjpeg-10", "--data-root", str(tmp_path))
    assert rc == 1 and "not found at" in out and "cilbench data prepare toyjpeg" in " ".join(out.split())


def test_prepare_extracts_a_wrapped_zip_after_checking_its_md5_and_leaves_the_source_alone(
        toy_bench, toy_data, tmp_path, capsys):
    damaged = tmp_path / "damaged" / "toyjpeg.zip"            # a download with one byte more: another md5
    damaged.parent.mkdir()
    damaged.write_bytes((toy_data / "toyjpeg.zip").read_bytes() + b"\0")
    assert main(["data", "prepare", "toyjpeg", "--from", str(damaged), "--data-root", str(tmp_path / "out")]) == 2
    assert "has md5" in " ".join(capsys.readouterr().out.split()) and not (tmp_path / "out" / "toyjpeg").exists()
    archive = toy_data / "toyjpeg.zip"
    digest = hashlib.md5(archive.read_bytes()).hexdigest()
    assert main(["data", "prepare", "toyjpeg", "--from", str(archive), "--data-root", str(tmp_path / "out")]) == 0
    assert "matches the published" in capsys.readouterr().out
    assert tree(tmp_path / "out" / "toyjpeg") == tree(toy_data / "toyjpeg")
    assert hashlib.md5(archive.read_bytes()).hexdigest() == digest
    rc, out = check(capsys, "toyjpeg-10", "--data-root", str(tmp_path / "out"), "--no-decode")
    assert rc == 0, out


def test_prepare_streams_a_tgz(toy_bench, toy_data, tmp_path):
    archive = tmp_path / "toyjpeg.tgz"
    with tarfile.open(archive, "w:gz") as tf:
        with zipfile.ZipFile(toy_data / "toyjpeg.zip") as zf:
            files = {f"objnet/{n}": zf.read(n) for n in zf.namelist()}
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    assert main(["data", "prepare", "toyjpeg", "--from", str(archive), "--data-root", str(tmp_path / "out"),
                 "--no-verify"]) == 0
    assert tree(tmp_path / "out" / "toyjpeg") == tree(toy_data / "toyjpeg")


def _parquet_snapshot(toy_data: Path, folder: Path, names: bool) -> Path:
    """A Hugging Face-style snapshot: data/{train,test}-0000k-of-00002.parquet, image {bytes, path} + label."""
    classes = sorted(os.listdir(toy_data / "toyjpeg" / "train"))
    meta = {b"huggingface": json.dumps({"info": {"features": {
        "image": {"_type": "Image"}, "label": {"names": classes, "_type": "ClassLabel"}}}}).encode()} if names else None
    (folder / "data").mkdir(parents=True)
    for split in ("train", "test"):
        rows = [(p.read_bytes(), p.name, classes.index(p.parent.name))
                for p in sorted((toy_data / "toyjpeg" / split).rglob("*.jpg"))]
        for k in range(2):
            part = rows[k::2]
            table = pa.table({"image": pa.array([{"bytes": b, "path": n} for b, n, _ in part]),
                              "label": pa.array([label for _, _, label in part], pa.int64())})
            pq.write_table(table.replace_schema_metadata(meta), folder / "data" / f"{split}-0000{k}-of-00002.parquet")
    return folder


@pytest.mark.parametrize("names", [True, False])
def test_prepare_turns_a_parquet_snapshot_into_class_folders(toy_bench, toy_data, tmp_path, names):
    snapshot = _parquet_snapshot(toy_data, tmp_path / "snapshot", names)
    before = tree(snapshot)
    assert main(["data", "prepare", "toyjpeg", "--from", str(snapshot), "--data-root", str(tmp_path / "out")]) == 0
    expected = tree(toy_data / "toyjpeg")
    if not names:   # no ClassLabel names: the label id, zero-padded to sort in label order
        expected = {k.replace("/c", "/", 1): v for k, v in expected.items()}
    assert tree(tmp_path / "out" / "toyjpeg") == expected
    assert tree(snapshot) == before


def test_an_interrupted_prepare_resumes_and_finishes(toy_bench, toy_data, tmp_path):
    snapshot = _parquet_snapshot(toy_data, tmp_path / "snapshot", names=True)
    cmd = [sys.executable, "-m", "cilbench.cli", "data", "prepare", "toyjpeg", "--from", str(snapshot),
           "--data-root", str(tmp_path / "out")]
    env = {**os.environ, "CILBENCH_KILL_AT": "prepare:40"}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9
    out = tmp_path / "out" / "toyjpeg"
    assert len(tree(out)) == 40 and not (out / ".cilbench-prepared.json").exists()
    assert not [p for p in out.rglob("*.partial")]
    env.pop("CILBENCH_KILL_AT")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "260 written, 40 already there" in " ".join(done.stdout.split())
    assert tree(out) == tree(toy_data / "toyjpeg")
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert "already prepared" in again.stdout


def test_vtab_runs_in_natural_order_and_its_shuffled_variant_in_the_seed_1993_order():
    """APER/EASE/MOS/RanPAC run VTAB with shuffle false (folder order 0..49); CaRE's released config
    shuffles with seed 1993: ``np.random.seed(1993); np.random.permutation(50)`` (PILOT's data_manager)."""
    import numpy as np

    from cilbench.benchmark import get_benchmark, load_benchmark_files
    from cilbench.errors import ConfigError
    from cilbench.runner import RunRequest, resolve

    load_benchmark_files()
    natural, shuffled = get_benchmark("vtab-5"), get_benchmark("vtab-5-shuffled")
    assert (natural.class_order, shuffled.class_order) == ("natural", "seeded")
    assert "natural" in natural.description.lower() and "care" in shuffled.description.lower()
    from cilbench.data.stream import ClassIncrementalData
    from tests.helpers import tiny_data

    tiny = tiny_data()
    orders = {}
    for flag in (True, False):
        orders[flag] = ClassIncrementalData(tiny.train, tiny.test, 12, tiny.splits, 1993, natural_order=flag).order
    np.testing.assert_array_equal(orders[True], np.arange(12))
    np.testing.assert_array_equal(orders[False], np.random.RandomState(1993).permutation(12))
    with pytest.raises(ConfigError, match="natural"):
        resolve(RunRequest("simplecil", "vtab-5", order_seed=7, check_device=False))
    assert resolve(RunRequest("simplecil", "vtab-5-shuffled", order_seed=7, check_device=False)).run.order_seed == 7


def test_loader_defaults_follow_the_device_and_the_cores_and_yield_to_settings():
    from cilbench.data.sources import loader_defaults

    assert loader_defaults("cuda", None, None, None, cores=16) == (8, True, True)
    assert loader_defaults("cuda", None, None, None, cores=4) == (3, True, True)
    assert loader_defaults("cpu", None, None, None, cores=2) == (1, False, True)
    assert loader_defaults("cpu", None, None, None, cores=1) == (0, False, False)
    assert loader_defaults("cuda", 2, False, False, cores=16) == (2, False, False)
