"""Overlapping-task protocol: recurring classes, disjoint shares of their images, the global label
space, and every method running on it."""
import json

import numpy as np
import pytest
import torch

from cilbench.benchmark import get_benchmark, parse_benchmark_file
from cilbench.data.sources import load_splits
from cilbench.data.stream import ClassIncrementalData
from cilbench.errors import ConfigError
from cilbench.method import Task
from cilbench.protocol import make_splits, sample_owners, with_recurring
from cilbench.registry import METHODS
from cilbench.runner import RunRequest, execute, resolve
from cilbench.methods.common.losses import current_task_ce
from cilbench.methods.simplecil import SimpleCIL, SimpleCILConfig
from tests.helpers import make_method


def data_for(bench="tiny-overlap", shots=0):
    spec = get_benchmark(bench)
    train, test = load_splits(spec.dataset, None)
    return ClassIncrementalData(train, test, spec.n_classes, spec.splits, spec.order_seed, shots=shots), spec


def test_later_tasks_revisit_earlier_classes_reproducibly():
    splits = get_benchmark("tiny-overlap").splits
    assert [len(s.recurring) for s in splits] == [0, 2, 2]
    for s in splits:
        assert all(c < s.start for c in s.recurring) and s.labels == [*s.recurring, *range(s.start, s.stop)]
    assert splits == get_benchmark("tiny-overlap").splits
    assert with_recurring(make_splits(12, 4, 4), 0.0, 1) == make_splits(12, 4, 4)


def test_each_training_image_belongs_to_exactly_one_task():
    data, spec = data_for()
    views = [data.training.task_view(t, 64, False, False, 0) for t in range(len(spec.splits))]
    all_idx = np.concatenate([v.indices for v in views])
    assert len(all_idx) == len(np.unique(all_idx)) == len(data.train.targets)
    for s, v in zip(spec.splits, views):
        labels = data.label_of[data.train.targets[v.indices]]
        assert set(labels.tolist()) == set(s.labels)
    recurring = spec.splits[1].recurring[0]
    shares = [int((data.label_of[data.train.targets[v.indices]] == recurring).sum()) for v in views]
    assert sum(shares) == 8 and max(s for s in shares if s) - min(s for s in shares if s) <= 1


def test_few_shot_and_overlap_split_the_n_shots():
    data, spec = data_for(shots=4)
    counts = np.zeros(spec.n_classes, dtype=int)
    for t in range(len(spec.splits)):
        v = data.training.task_view(t, 64, False, False, 0)
        counts += np.bincount(data.label_of[data.train.targets[v.indices]], minlength=spec.n_classes)
    assert (counts == 4).all()


def test_owners_without_recurring_are_the_introducing_task():
    labels = np.array([0, 1, 2, 3, 3, -1])
    assert sample_owners(labels, make_splits(4, 0, 2), 0).tolist() == [0, 0, 1, 1, 1, -1]


def test_a_recurring_class_prototype_averages_all_its_images():
    torch.manual_seed(0)
    method, tasks = make_method(SimpleCIL, SimpleCILConfig(), "tiny-overlap")
    for t in tasks:
        method.learn(t)
    data = tasks[0].data
    feats, labels = [], []
    for b in data.seen_view(len(tasks) - 1, 64, False, False, 0):
        with torch.no_grad():
            feats.append(method.backbone(b.images))
        labels.append(b.labels)
    f, y = torch.cat(feats), torch.cat(labels)
    expected = torch.stack([f[y == c].mean(0) for c in range(12)])
    assert torch.allclose(method.head.protos, expected, atol=1e-5)
    assert method.head.counts.tolist() == [8] * 12


def test_the_task_mask_covers_recurring_classes_in_the_global_label_space():
    data, spec = data_for()
    task = Task(1, 3, spec.splits[1].start, spec.splits[1].stop, data)
    logits = torch.randn(6, 8, requires_grad=True)
    labels = torch.tensor(task.labels[:6])
    current_task_ce(logits, labels, task).backward()
    outside = [c for c in range(8) if c not in task.labels]
    assert torch.count_nonzero(logits.grad[:, outside]) == 0
    assert torch.count_nonzero(logits.grad[:, task.labels]) > 0


def test_care_reads_recurring_classes_from_their_old_heads():
    from cilbench.methods.care import task_columns

    data, spec = data_for()
    task = Task(2, 3, spec.splits[2].start, spec.splits[2].stop, data)
    logits = torch.arange(12.0).repeat(2, 1)
    labels = torch.tensor([task.recurring[1], task.start + 2])
    cols, local = task_columns(logits, labels, task)
    assert cols[0].tolist() == [float(c) for c in task.labels]
    assert local.tolist() == [1, len(task.recurring) + 2]


FAST = {"simplecil": [], "finetune": ["method.epochs=1"], "joint": ["method.epochs=1"],
        "aper": ["method.tuned_epoch=1"], "l2p": ["method.epochs=1"], "dualprompt": ["method.epochs=1"],
        "coda-prompt": ["method.epochs=1"], "care": ["method.tuned_epoch=2", "method.crct_epochs=1"],
        "rwf": [], "samoe": ["method.epochs=1"]}


def test_fast_settings_cover_every_registered_method():
    assert set(FAST) == set(METHODS.names())


@pytest.mark.parametrize("method", sorted(FAST))
def test_every_method_runs_the_overlap_protocol(tmp_path, method):
    rd = execute(resolve(RunRequest(method, "tiny-overlap", out=str(tmp_path), sets=FAST[method])))
    s = json.loads((rd.path / "summary.json").read_text())
    assert s["status"] == "finished"
    last = [e for e in rd.read_events()][-1]
    assert len(last["per_task"]) == 3 and all(np.isfinite(last["per_task"]))
    if method == "samoe":   # method diagnostics reach the run's log.txt
        assert "of recurring-class ones" in (rd.path / "log.txt").read_text()


def test_overlap_must_be_a_fraction(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[dataset.d]\ndisplay="D"\nsource="synthetic"\nn_classes=4\nimage_size=32\n'
                   '[benchmark.b]\ndataset="d"\nincrement=2\noverlap=1.5\n')
    with pytest.raises(ConfigError, match="overlap"):
        parse_benchmark_file(bad)
