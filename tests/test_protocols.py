"""Few-shot and online protocols through the whole run (every method can be run under them)."""
import json

import numpy as np
import pytest

from cilbench.data.stream import few_shot
from cilbench.errors import CilbenchError
from cilbench.runner import RunRequest, execute, resolve


def test_few_shot_draws_n_per_class_at_random_and_reproducibly():
    labels = np.repeat(np.arange(4), [5, 2, 7, 3])
    picked = few_shot(labels, 3, seed=1993)
    assert np.bincount(labels[picked]).tolist() == [3, 2, 3, 3]
    assert np.array_equal(picked, few_shot(labels, 3, seed=1993))
    assert not np.array_equal(picked, few_shot(labels, 3, seed=7))


def summary(rd):
    return json.loads((rd.path / "summary.json").read_text())


def test_shots_limit_every_task_and_name_the_protocol(tmp_path):
    rd = execute(resolve(RunRequest("simplecil", "tiny-3", out=str(tmp_path), shots=2)))
    assert rd.path.name == "tiny-3__2shot__simplecil__s1993"
    assert summary(rd)["benchmark"] == "tiny-3+2shot"
    r = resolve(RunRequest("simplecil", "tiny-3", shots=2))
    from cilbench.data.sources import load_splits
    from cilbench.data.stream import ClassIncrementalData
    train, test = load_splits(r.bench.dataset, None)
    data = ClassIncrementalData(train, test, 12, r.bench.splits, 1993, shots=2)
    view = data.training.train_view(0, 12, 100, False, False, 0)
    assert view.n_samples == 24


def test_rwf_runs_online_by_default_and_offline_on_request(tmp_path):
    assert resolve(RunRequest("rwf", "tiny-3")).run.online is True
    assert resolve(RunRequest("simplecil", "tiny-3")).run.online is False
    assert resolve(RunRequest("rwf", "tiny-3", sets=["run.online=false"])).run.online is False
    rd = execute(resolve(RunRequest("rwf", "tiny-3", out=str(tmp_path))))
    assert summary(rd)["benchmark"] == "tiny-3+online" and summary(rd)["status"] == "finished"


def test_a_multi_pass_method_under_the_online_protocol_is_refused_before_it_runs(tmp_path):
    with pytest.raises(CilbenchError, match="finetune reads each task's data 5 times"):
        resolve(RunRequest("finetune", "tiny-3", out=str(tmp_path), sets=["run.online=true"]))
    rd = execute(resolve(RunRequest("finetune", "tiny-3", out=str(tmp_path), name="one-pass",
                                    sets=["run.online=true", "method.epochs=1"])))
    assert summary(rd)["status"] == "finished"


def test_tables_label_reimplementations():
    from cilbench.compare import with_label

    assert with_label("rwf") == "rwf: RwF-style (re-implementation)"
    assert with_label("simplecil") == "simplecil" and with_label("l2p (published)") == "l2p (published)"
