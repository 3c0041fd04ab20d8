"""The method contract, checked on every registered method: a prediction never depends on the other
samples of its batch, and every protocol setting is honoured or refused."""
import pytest
import torch

from cilbench.data.base import Batch
from cilbench.errors import ConfigError
from cilbench.registry import METHODS
from cilbench.runner import RunRequest, resolve
from tests.helpers import make_method, tiny_data

# the briefest training that still exercises each method's learned parts
QUICK = {"finetune": ["method.epochs=1"], "joint": ["method.epochs=1", "method.schedule=every"],
         "care": ["method.tuned_epoch=2", "method.crct_epochs=1"], "samoe": ["method.epochs=1"],
         "l2p": ["method.epochs=1"], "dualprompt": ["method.epochs=1"], "coda-prompt": ["method.epochs=1"],
         "aper": ["method.tuned_epoch=1"]}


def trained(name, sets=()):
    """The method after learning the first two tasks of tiny-3 (the run's own resolved settings)."""
    from cilbench.method import OnlineProtocol

    r = resolve(RunRequest(name, "tiny-3", sets=[*QUICK.get(name, []), *sets]))
    torch.manual_seed(0)
    method, tasks = make_method(r.method_cls, r.method_cfg, backbone=r.backbone,
                                online=OnlineProtocol(r.run.online, r.run.online_batch_size, r.run.online_iters))
    for task in tasks[:2]:
        method.learn(task)
    return method, tiny_data()


def one_by_one(method, batch: Batch) -> torch.Tensor:
    return torch.cat([method.predict(Batch(batch.images[i:i + 1], batch.labels[i:i + 1], batch.keys[i:i + 1],
                                           batch.split)) for i in range(len(batch.labels))])


@pytest.mark.parametrize("name", METHODS.names())
def test_a_prediction_does_not_depend_on_its_batch_mates(name):
    method, data = trained(name)
    batch = next(iter(data.test_view(8, 32)))                  # shuffled: both tasks' classes mixed
    with torch.no_grad():
        together = method.predict(batch)
        alone = one_by_one(method, batch)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_the_check_can_fail_pilots_test_batch_vote_depends_on_the_batch():
    method, data = trained("l2p", ["method.test_batch_vote=true"])
    batch = next(iter(data.test_view(8, 32)))
    with torch.no_grad():
        assert not torch.allclose(method.predict(batch), one_by_one(method, batch), atol=1e-4)


@pytest.mark.parametrize("sets, match", [
    (["run.online_iters=3"], "run.online_iters applies to the online protocol only"),
    (["run.online_batch_size=4"], "run.online_batch_size applies to the online protocol only"),
    (["run.precision=bf16"], "takes effect through CUDA autocast only"),
])
def test_protocol_settings_that_would_do_nothing_are_refused(sets, match):
    with pytest.raises(ConfigError, match=match):
        resolve(RunRequest("l2p", "tiny-3", sets=sets))


@pytest.mark.parametrize("name, sets, match", [
    ("joint", ["run.online=true"], "joint trains on every seen task's data at once"),
    ("aper", ["run.online=true"], "aper reads each task's data 21 times"),
    ("care", ["run.online=true"], "care reads each task's data"),
    ("simplecil", ["run.online=true", "run.online_iters=2"], "simplecil takes no gradient steps"),
])
def test_methods_refuse_the_online_settings_they_cannot_honour(name, sets, match):
    with pytest.raises(ConfigError, match=match):
        resolve(RunRequest(name, "tiny-3", sets=sets))


def test_every_method_accepts_or_refuses_the_online_protocol_before_running(tmp_path):
    """No method is left to fail mid-run: resolve either refuses it or the whole online run finishes."""
    from cilbench.runner import execute

    for name in METHODS.names():
        one_pass = ["method.epochs=1"] if "epochs" in METHODS.get(name).Config.__dataclass_fields__ else []
        try:
            r = resolve(RunRequest(name, "tiny-3", out=str(tmp_path), sets=["run.online=true", *one_pass]))
        except ConfigError:
            continue
        assert execute(r).status() == "finished", name


def test_online_iters_change_what_the_shared_loop_learns(tmp_path):
    """The issue's finding: l2p gave bit-identical matrices at online_iters 1 and 4."""
    from cilbench.runner import execute

    import pandas as pd
    mats = []
    for iters in (1, 4):
        r = resolve(RunRequest("l2p", "tiny-3", out=str(tmp_path), name=f"i{iters}",
                               sets=["run.online=true", "method.epochs=1", f"run.online_iters={iters}"]))
        mats.append(pd.read_csv(execute(r).path / "top1_hits.csv", index_col=0).to_numpy())
    assert not (mats[0] == mats[1]).all()
