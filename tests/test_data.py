from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cilbench.benchmark import DatasetSpec
from cilbench.data.sources import load_splits
from cilbench.data.stream import ClassIncrementalData
from cilbench.data.synthetic import class_factors, render_split
from cilbench.data.transforms import AugmentConfig, random_resized_crop
from cilbench.errors import DataError
from cilbench.protocol import make_splits


def folder_spec(n_classes=3, size=32) -> DatasetSpec:
    return DatasetSpec(key="toy", display="Toy", source="imagefolder", folder="toy", n_classes=n_classes,
                       image_size=size, published="made by the test")


def write_tree(root: Path, classes=("ant", "bee", "cat"), per_class=(4, 2), size=40) -> Path:
    rng = np.random.RandomState(0)
    for part, n in zip(("train", "test"), per_class):
        for c in classes:
            d = root / "toy" / part / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_imagefolder_loads_the_pilot_layout(tmp_path):
    write_tree(tmp_path)
    train, test = load_splits(folder_spec(), tmp_path)
    assert len(train) == 12 and len(test) == 6
    assert sorted(set(train.targets.tolist())) == [0, 1, 2]
    data = ClassIncrementalData(train, test, 3, make_splits(3, 0, 2), order_seed=1993)
    batches = list(data.test_view(3, batch_size=4))
    assert sum(len(b.labels) for b in batches) == 6
    assert batches[0].images.shape[1:] == (3, 32, 32)          # Resize + CenterCrop to image_size
    assert 0.0 <= batches[0].images.min() and batches[0].images.max() <= 1.0
    aug = next(iter(data.training.train_view(0, 2, batch_size=8, shuffle=True, augment=True, seed=0)))
    assert aug.images.shape[1:] == (3, 32, 32) and aug.augmented
    assert set(aug.labels.tolist()) <= {0, 1}                  # task 0 = first two classes in the order


def test_missing_dataset_names_path_layout_and_source(tmp_path):
    with pytest.raises(DataError) as e:
        load_splits(folder_spec(), tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "toy") in msg and "train/<class>" in msg and "made by the test" in msg


def test_no_data_root_is_an_error():
    with pytest.raises(DataError, match="data root"):
        load_splits(folder_spec(), None)


def test_wrong_layout_is_an_error(tmp_path):
    (tmp_path / "toy" / "images" / "ant").mkdir(parents=True)
    with pytest.raises(DataError, match="no train/ folder"):
        load_splits(folder_spec(), tmp_path)


def test_train_test_class_mismatch_is_an_error(tmp_path):
    write_tree(tmp_path)
    (tmp_path / "toy" / "test" / "dog").mkdir()
    with pytest.raises(DataError, match="only in test: \\['dog'\\]"):
        load_splits(folder_spec(), tmp_path)


def test_class_count_mismatch_is_an_error(tmp_path):
    write_tree(tmp_path)
    with pytest.raises(DataError, match="has 3 classes"):
        load_splits(folder_spec(n_classes=5), tmp_path)


def test_corrupt_image_fails_naming_the_file(tmp_path):
    write_tree(tmp_path)
    bad = tmp_path / "toy" / "test" / "bee" / "broken.png"
    bad.write_bytes(b"not a png")
    train, test = load_splits(folder_spec(), tmp_path)
    data = ClassIncrementalData(train, test, 3, make_splits(3, 0, 3), order_seed=1993)
    with pytest.raises(DataError, match="broken.png"):
        list(data.test_view(3, batch_size=4))


def test_synthetic_is_deterministic_and_size_independent():
    a, la = render_split("bench", "train", 70, 3)
    b, lb = render_split("bench", "train", 70, 3)
    c, _ = render_split("bench", "train", 5, 3)
    assert torch.equal(a, b) and np.array_equal(la, lb)
    assert torch.equal(a[:15], c)                       # class k renders the same in any dataset size
    assert a.dtype == torch.uint8 and a.shape == (210, 3, 32, 32)
    assert not torch.equal(a[:3], render_split("bench", "test", 5, 3)[0][:3])


def test_synthetic_domains_are_disjoint_and_large():
    bench = {tuple(r) for r in class_factors("bench", 2048)}
    pre = {tuple(r) for r in class_factors("pretrain", 1000)}
    assert len(bench) == 2048 and len(pre) == 1000
    assert not bench & pre


def test_synthetic_classes_differ_more_than_samples_within_a_class_but_pixels_do_not_solve_them():
    x, _ = render_split("bench", "train", 20, 6)
    x = x.float().view(20, 6, -1)
    within = torch.stack([torch.cdist(c, c).sum() / (6 * 5) for c in x]).mean()   # same-class pairs
    flat, label = x.reshape(120, -1), torch.arange(20).repeat_interleave(6)
    between = torch.cdist(flat, flat)[label[:, None] != label[None]].mean()      # different-class pairs
    assert within > 0                     # per-image nuisance exists
    assert between > within               # a class is a real signal
    xt, yt = render_split("bench", "test", 20, 6)
    nearest_mean = torch.cdist(xt.float().view(120, -1), x.mean(1)).argmin(1)
    acc = (nearest_mean == torch.as_tensor(yt)).float().mean().item()
    assert 2 / 20 < acc < 0.6             # above chance in pixel space, far from solved


def test_batched_random_resized_crop_is_per_sample():
    img = torch.rand(1, 3, 32, 32).expand(16, 3, 32, 32).contiguous()
    out = random_resized_crop(img, AugmentConfig(size=24, scale=(0.3, 0.6)), torch.Generator().manual_seed(0))
    assert out.shape == (16, 3, 24, 24)
    assert len({tuple(o.flatten()[:8].tolist()) for o in out}) > 1   # different crops per sample
