"""Every protocol setting a published number depends on, checked against its source: one test per setting.

Expected values are transcribed here from the sources named in each test (the papers' released
configs and code as the specs quote them), not read from cilbench's files.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cilbench.benchmark import get_benchmark, load_benchmark_files
from cilbench.data import folder_split
from cilbench.data.stream import ClassIncrementalData
from cilbench.protocol import class_order
from cilbench.runner import RunRequest, resolve
from tests.helpers import tiny_data

IN21K = "vit_base_patch16_224.augreg_in21k"


@pytest.fixture(autouse=True)
def benchmarks():
    load_benchmark_files()


def order_of(bench: str) -> np.ndarray:
    """The class order a run of ``bench`` uses (ClassIncrementalData's), without its images."""
    b = get_benchmark(bench)
    tiny = tiny_data()
    data = ClassIncrementalData(tiny.train, tiny.test, 12, tiny.splits, b.order_seed,
                                natural_order=b.class_order == "natural")
    assert data.order.tolist() == class_order(12, b.order_seed, shuffle=b.class_order != "natural").tolist()
    return class_order(b.n_classes, b.order_seed, shuffle=b.class_order != "natural")


@pytest.mark.parametrize("bench, first", [
    # pilot.md §1.3, computed with numpy's legacy RandomState(1993) as PILOT's data_manager does
    ("cifar-10", [68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89, 3, 92, 55, 9, 26, 80, 43, 38]),
    ("inr-10", [168, 136, 51, 9, 183, 101, 171, 99, 42, 159, 191, 70, 16, 188, 27, 10, 175, 26, 68, 187]),
    ("ina-10", [168, 136, 51, 9, 183, 101, 171, 99, 42, 159]),
    ("obj-10", [168, 136, 51, 9, 183, 101, 171, 99, 42, 159]),
    ("ob-10", [169, 221, 146, 296, 92, 229, 49, 70, 126, 77]),
])
def test_class_order_is_the_seed_1993_permutation(bench, first):
    assert order_of(bench)[:len(first)].tolist() == first


def test_vtab_runs_in_natural_order_as_aper_ease_mos_ranpac_and_shuffled_as_care():
    """RevisitingCIL README: VTAB with shuffle false; CaRE exps/vtab/care_vtab_inc10.json: shuffle true."""
    assert order_of("vtab-5").tolist() == list(range(50))
    assert order_of("vtab-5-shuffled")[:3].tolist() != [0, 1, 2]


@pytest.mark.parametrize("bench, tasks, sizes", [
    # CaRE Table 1 / methods.md §1.8: B100Inc6 = 1 + 150 tasks, B100Inc3 = 1 + 300
    ("ob1k-100", 100, {10}), ("ob1k-200", 200, {5}), ("ob1k-151", 151, {100, 6}), ("ob1k-301", 301, {100, 3}),
    ("inr-50", 50, {4}), ("inr-10", 10, {20}), ("inr-20", 20, {10}), ("inr-40", 40, {5}),
    ("cifar-10", 10, {10}), ("cifar-20", 20, {5}), ("ina-10", 10, {20}), ("ina-50", 50, {4}),
    ("obj-10", 10, {20}), ("obj-20", 20, {10}), ("obj-50", 50, {4}), ("ob-10", 10, {30}), ("ob-60", 60, {5}),
    ("vtab-5", 5, {10}), ("cub-10", 10, {20}),
])
def test_increments_give_the_papers_task_counts(bench, tasks, sizes):
    splits = get_benchmark(bench).splits
    assert len(splits) == tasks and {len(s) for s in splits} == sizes


@pytest.mark.parametrize("dataset_bench, normalised", [
    # CaRE utils/data.py (pilot.md §4 #2): mean = std = 0.5 for CIFAR, ImageNet-A and VTAB only
    ("cifar-10", True), ("ina-10", True), ("vtab-5", True),
    ("inr-10", False), ("obj-10", False), ("ob-10", False), ("ob1k-100", False),
])
def test_normalisation_follows_care_per_dataset(dataset_bench, normalised):
    assert get_benchmark(dataset_bench).dataset.normalize is normalised


def test_backbone_normalize_is_honoured_by_a_run(tmp_path):
    """PILOT's utils/data.py has no Normalize for any of these datasets (pilot.md §1.4): the PILOT-family
    cells run with backbone.normalize=off. On a dataset that normalises (tiny: the default), "on" must
    give the default's numbers and "off" others."""
    from cilbench.runner import execute

    def hits(name: str, sets: list[str]) -> np.ndarray:
        rd = execute(resolve(RunRequest("simplecil", "tiny-3", out=str(tmp_path), name=name, sets=sets)))
        return pd.read_csv(rd.path / "top1_hits.csv", index_col=0).to_numpy()
    default, on, off = hits("d", []), hits("on", ["backbone.normalize=on"]), hits("off", ["backbone.normalize=off"])
    np.testing.assert_array_equal(default, on)
    assert not np.array_equal(default, off, equal_nan=True)   # NaN above the diagonal


def test_test_transform_is_resize_256_bicubic_then_centre_crop_224():
    """PILOT utils/data.py build_transform (pilot.md §1.4): Resize(256, interpolation=3), CenterCrop(224)."""
    resize, crop = folder_split.test_transform(224).transforms
    assert resize.size == 256 and resize.interpolation.value == "bicubic" and crop.size == (224, 224)


@pytest.mark.parametrize("bench, scale", [
    # PILOT build_transform: RandomResizedCrop(224, scale=(0.05, 1.0)); CaRE's CIFAR: (0.08, 1.0)
    ("inr-10", (0.05, 1.0)), ("ob1k-100", (0.05, 1.0)), ("obj-10", (0.05, 1.0)), ("cifar-10", (0.08, 1.0)),
])
def test_training_crop_scale_and_ratio(bench, scale):
    from cilbench.data.transforms import AugmentConfig

    spec = get_benchmark(bench).dataset
    crop, flip = folder_split.train_transform(AugmentConfig(size=224, scale=tuple(spec.train_scale))).transforms
    assert crop.size == (224, 224) and crop.scale == scale and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert flip.p == 0.5


def test_every_real_benchmark_names_the_in21k_timm_tag_never_the_bare_name():
    """timm >= 0.9: bare 'vit_base_patch16_224' is the IN21K-pretrained, IN1K-fine-tuned model; the papers'
    IN21K backbone is 'vit_base_patch16_224.augreg_in21k'."""
    from cilbench.benchmark import REPO_BENCHMARKS, parse_benchmark_file

    real = [b for path in REPO_BENCHMARKS.glob("*.toml") for b in parse_benchmark_file(path)
            if b.dataset.source != "synthetic"]
    assert len(real) >= 20
    for b in real:
        assert b.backbone == IN21K, b.name


@pytest.mark.parametrize("bench, expected", [
    # CaRE exps/<dataset>/care_*.json: tuned_epoch, init_lr, batch_size, crct_epochs (+ ca_lr, ca_storage,
    # m, decay where they differ from the defaults)
    ("ob1k-100", dict(tuned_epoch=20, init_lr=0.02, batch_size=32, crct_epochs=5, iter_pred=False)),
    ("ob1k-200", dict(tuned_epoch=20, init_lr=0.01, batch_size=16, crct_epochs=3, iter_pred=False)),
    ("ob1k-151", dict(tuned_epoch=20, init_lr=0.02, batch_size=32, crct_epochs=3, iter_pred=False)),
    ("ob1k-301", dict(tuned_epoch=20, init_lr=0.01, batch_size=16, crct_epochs=3, iter_pred=False)),
    ("inr-10", dict(tuned_epoch=60, init_lr=0.02, batch_size=32, crct_epochs=30)),
    ("inr-20", dict(tuned_epoch=60, init_lr=0.01, batch_size=16, crct_epochs=30)),
    ("inr-50", dict(tuned_epoch=20, init_lr=0.05, batch_size=16, crct_epochs=20)),
    ("cifar-10", dict(tuned_epoch=60, init_lr=0.05, batch_size=64, crct_epochs=30, decay=False)),
    ("cifar-20", dict(tuned_epoch=60, init_lr=0.05, batch_size=64, crct_epochs=30, decay=False)),
    ("ina-10", dict(tuned_epoch=20, init_lr=0.01, batch_size=16, crct_epochs=10, ca_lr=0.01, ca_stats="variance",
                    margin=0.3)),
    ("ina-50", dict(tuned_epoch=20, init_lr=0.01, batch_size=16, crct_epochs=10, ca_lr=0.01, ca_stats="variance",
                    margin=0.3)),
    ("obj-10", dict(tuned_epoch=30, init_lr=0.05, batch_size=64, crct_epochs=30)),
    ("obj-20", dict(tuned_epoch=30, init_lr=0.05, batch_size=64, crct_epochs=30)),
    ("obj-50", dict(tuned_epoch=30, init_lr=0.01, batch_size=16, crct_epochs=30)),
    ("ob-60", dict(tuned_epoch=20, init_lr=0.01, batch_size=16, crct_epochs=30)),
    ("vtab-5-shuffled", dict(tuned_epoch=30, init_lr=0.01, batch_size=16, crct_epochs=30)),
])
def test_care_epochs_learning_rates_and_batch_sizes_are_the_released_configs(bench, expected):
    cfg = resolve(RunRequest("care", bench, check_device=False)).method_cfg
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.ca_lr == expected.get("ca_lr", 0.005) and cfg.ca_stats == expected.get("ca_stats", "covariance")


@pytest.mark.parametrize("method, bench, expected", [
    # PILOT exps/*.json (pilot.md §3): CIFAR (cifar224) and ImageNet-R (imagenetr) configs
    ("l2p", "cifar-10", dict(epochs=5, lr=0.001875, batch_size=16, pool_size=10, prompt_length=5, top_k=5)),
    ("l2p", "inr-10", dict(epochs=10, lr=0.001875, batch_size=32, pool_size=10, prompt_length=5, top_k=5)),
    ("dualprompt", "cifar-10", dict(epochs=5, lr=0.001, batch_size=24, pool_size=10, top_k=1)),
    ("dualprompt", "inr-10", dict(epochs=10, lr=0.001, batch_size=24, pool_size=10, top_k=1)),
    ("coda-prompt", "cifar-10", dict(epochs=20, lr=0.001, batch_size=128, pool_size=100)),
    ("coda-prompt", "inr-10", dict(epochs=50, lr=0.001, batch_size=128, pool_size=100)),
    ("aper", "cifar-10", dict(tuned_epoch=20, init_lr=0.01, batch_size=48, weight_decay=5e-4)),
    ("aper", "inr-10", dict(tuned_epoch=10, init_lr=0.05, batch_size=16, weight_decay=5e-3)),
    ("simplecil", "cifar-10", dict(batch_size=128)),
])
def test_pilot_method_configs_per_dataset(method, bench, expected):
    cfg = resolve(RunRequest(method, bench, check_device=False)).method_cfg
    assert {k: getattr(cfg, k) for k in expected} == expected
