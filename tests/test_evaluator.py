"""The evaluator against known answers: stub methods whose accuracy matrix is worked out by hand.

tiny-3 (tests/conftest.py): 12 classes, B4 Inc4 -> 3 tasks of 4 classes, 4 test images per class, so
every cell scores 16 images and A_t is over 16, 32 and 48 images.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cilbench.benchmark import DatasetSpec
from cilbench.data.sources import load_splits
from cilbench.data.stream import ClassIncrementalData
from cilbench.errors import CilbenchError
from cilbench.evaluator import Evaluator
from cilbench.method import Method, RunContext
from cilbench.metrics import summarize
from cilbench.protocol import make_splits
from tests.helpers import tiny_data


class Stub(Method):
    """Predicts from the label and the number of tasks learned (a test instrument, not a method)."""

    name = "stub"
    Config = dict

    def __init__(self, correct=lambda label, tasks_learned: True, logits=None):
        super().__init__({}, RunContext())
        self.correct, self.logits, self.learned, self.n_seen = correct, logits, 0, 0

    def learn(self, task):
        self.learned, self.n_seen = task.index + 1, task.stop

    def predict(self, batch):
        if self.logits is not None:
            return self.logits(batch, self.n_seen)
        labels = batch.labels
        ok = torch.tensor([self.correct(int(y), self.learned) for y in labels])
        pred = torch.where(ok, labels, (labels + 1) % self.n_seen)
        return torch.nn.functional.one_hot(pred, self.n_seen).float()

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def run_all(method, data, eval_every=1, eval_batch_size=7):
    ev = Evaluator(method, data, RunContext(), eval_every=eval_every, eval_batch_size=eval_batch_size)
    events = [ev.run_task(t) for t in range(len(data.splits))]
    return ev.state.record(), events


def test_an_oracle_scores_100_everywhere_and_forgets_nothing():
    record, events = run_all(Stub(), tiny_data())
    m = summarize(record, 3)
    assert np.array_equal(record.n, [[16, np.nan, np.nan], [16, 16, np.nan], [16, 16, 16]], equal_nan=True)
    assert m["last_acc"] == m["avg_inc_acc"] == 100.0
    assert m["forgetting_pilot"] == m["forgetting_chaudhry"] == m["forgetting_avalanche"] == 0.0
    assert [e["n"] for e in events] == [[16], [16, 16], [16, 16, 16]]


def test_always_class_0_gives_the_known_matrix_and_top5():
    # logits -arange: class 0 first, then 1..4 -> top-1 hits only label 0 (4 images), top-5 labels 0-4
    stub = Stub(logits=lambda batch, n_seen: -torch.arange(n_seen, dtype=torch.float).expand(len(batch.labels), -1))
    record, _ = run_all(stub, tiny_data())
    expected = np.array([[25.0, np.nan, np.nan], [25.0, 0.0, np.nan], [25.0, 0.0, 0.0]])
    np.testing.assert_array_equal(record.a, expected)
    np.testing.assert_allclose(record.seen_accuracy(), [4 / 16 * 100, 4 / 32 * 100, 4 / 48 * 100])
    np.testing.assert_allclose(record.seen_accuracy(top5=True), [100.0, 20 / 32 * 100, 20 / 48 * 100])


def schedule(label, learned):
    """Task 0 (labels 0-3): half right after task 1, all right after task 2, none after task 3.
    Task 1 (labels 4-7): half right after task 2, all right after task 3. Task 2: right."""
    if label < 4:
        return {1: label < 2, 2: True, 3: False}[learned]
    if label < 8:
        return {2: label < 6, 3: True}[learned]
    return True


def test_a_stub_that_forgets_task_0_has_the_hand_computed_forgetting_under_every_definition():
    record, _ = run_all(Stub(schedule), tiny_data())
    np.testing.assert_array_equal(record.a, [[50, np.nan, np.nan], [100, 50, np.nan], [0, 100, 100]])
    m = summarize(record, 3)
    assert m["forgetting_pilot"] == pytest.approx((100 + 0) / 2)       # task 1's max includes the last row
    assert m["forgetting_chaudhry"] == pytest.approx((100 - 50) / 2)   # max(50, 100) - 0 ; 50 - 100
    assert m["forgetting_avalanche"] == pytest.approx((50 - 50) / 2)   # 50 - 0 ; 50 - 100
    assert m["bwt"] == pytest.approx(0.0)
    assert m["avg_inc_acc"] == pytest.approx((50 + 75 + 32 / 48 * 100) / 3)


def test_thinned_evaluation_leaves_rows_empty_and_always_evaluates_the_last_task():
    record, events = run_all(Stub(schedule), tiny_data(), eval_every=2)
    assert [e["acc"] is None for e in events] == [True, False, False]
    assert np.isnan(record.a[0]).all() and record.a[1, 0] == 100 and record.a[2, 1] == 100


def test_scores_do_not_depend_on_the_batch_size_and_batches_mix_tasks():
    data = tiny_data()
    first = next(iter(data.test_view(12, 16)))
    assert len(set((first.labels // 4).tolist())) == 3        # a 16-image batch spans all three tasks
    a = run_all(Stub(schedule), data, eval_batch_size=1)[0].a
    b = run_all(Stub(schedule), tiny_data(), eval_batch_size=48)[0].a
    np.testing.assert_array_equal(a, b)


def test_non_finite_logits_stop_the_run_naming_method_task_and_count():
    def nan_for_label_5(batch, n_seen):
        out = torch.zeros(len(batch.labels), n_seen)
        out[batch.labels == 5, 0] = float("nan")
        return out
    ev = Evaluator(Stub(logits=nan_for_label_5), tiny_data(), RunContext(), eval_batch_size=48)
    ev.run_task(0)                                              # label 5 is not seen yet
    with pytest.raises(CilbenchError, match=r"stub produced 4 non-finite logits on 4 of 32 test images after task 2"):
        ev.run_task(1)


def test_overlap_columns_count_each_class_once_in_the_task_that_introduced_it():
    record, _ = run_all(Stub(), tiny_data("tiny-overlap"))
    assert np.nansum(record.n, 1).tolist() == [16, 32, 48]     # recurring classes do not add images


def test_imagefolder_labels_round_trip_through_a_non_identity_class_order(tmp_path):
    """Each class folder's images have one grey level; a stub that reads the level back and maps it
    through the papers' order (computed here with numpy, independently of cilbench) scores 100 %."""
    names = [f"c{i}" for i in range(6)]
    for part in ("train", "test"):
        for i, name in enumerate(names):
            folder = tmp_path / "toy" / part / name
            folder.mkdir(parents=True)
            for k in range(2):
                Image.fromarray(np.full((32, 32, 3), 30 * i + 20, np.uint8)).save(folder / f"{k}.png")
    spec = DatasetSpec(key="toy", display="Toy", source="imagefolder", folder="toy", n_classes=6, image_size=32)
    train, test = load_splits(spec, tmp_path)
    np.random.seed(1993)
    order = np.random.permutation(6)                          # position p holds original class order[p]
    assert not np.array_equal(order, np.arange(6))
    label_of = np.argsort(order)
    data = ClassIncrementalData(train, test, 6, make_splits(6, 0, 2), order_seed=1993)

    def read_grey(batch, n_seen):
        original = torch.round((batch.images[:, 0, 16, 16] * 255 - 20) / 30).long()
        return torch.nn.functional.one_hot(torch.as_tensor(label_of)[original], 6)[:, :n_seen].float()
    record, _ = run_all(Stub(logits=read_grey), data)
    assert np.nanmin(record.a) == 100.0
    assert data.order.tolist() == order.tolist()


def test_online_iters_are_gradient_steps_on_each_streamed_batch():
    from cilbench.data.base import SinglePass
    from cilbench.engine import Schedule, fit

    view = tiny_data().training.task_view(0, 8, True, False, 0)          # 32 images -> 4 batches
    w = torch.nn.Parameter(torch.zeros(1))
    calls = []

    def loss(batch):
        calls.append(len(batch.labels))
        return (w - 1).pow(2).sum()
    # an online stream is one pass whatever the schedule's epochs
    result = fit([w], SinglePass(view, 0, steps_per_batch=3), loss, Schedule(5, 0.1, momentum=0.0), RunContext())
    assert calls == [8] * 12 and result.steps == 12             # 4 batches x 3 steps
    assert w.item() == pytest.approx(1 - 0.8 ** 12)             # w <- w - 0.1 * 2 (w - 1), twelve times


def test_protocol_json_records_the_class_order_and_order_seed_changes_it(tmp_path):
    from cilbench.runner import RunRequest, execute, resolve

    rd = execute(resolve(RunRequest("simplecil", "tiny-3", out=str(tmp_path), order_seed=7)))
    assert rd.path.name == "tiny-3__simplecil__s1993__o7"
    protocol = json.loads((rd.path / "protocol.json").read_text())
    np.random.seed(7)
    assert protocol["class_order"] == np.random.permutation(12).tolist()
    assert protocol["order_seed"] == 7
    summary = json.loads((rd.path / "summary.json").read_text())
    assert summary["order_seed"] == 7
    default = execute(resolve(RunRequest("simplecil", "tiny-3", out=str(tmp_path))))
    assert json.loads((default.path / "protocol.json").read_text())["class_order"] != protocol["class_order"]
