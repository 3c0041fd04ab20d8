import json

import numpy as np
import pandas as pd
import pytest

from cilbench.cli import main
from cilbench.method import Reporter
from cilbench.runner import RunRequest, execute, resolve


def run(method, tmp_path, bench="tiny-3", name=None, sets=(), force=False):
    r = resolve(RunRequest(method, bench, out=str(tmp_path), name=name, sets=list(sets)))
    return execute(r, force=force)


def matrix(rd):
    return pd.read_csv(rd.path / "accuracy_matrix.csv", index_col=0).to_numpy()


def test_simplecil_end_to_end_writes_the_run_folder(tmp_path):
    rd = run("simplecil", tmp_path)
    for f in ("config.toml", "events.jsonl", "accuracy_matrix.csv", "summary.json", "curves.png",
              "checkpoint/state.pt", "log.txt"):
        assert (rd.path / f).exists(), f
    s = json.loads((rd.path / "summary.json").read_text())
    assert s["status"] == "finished" and s["metrics"]["tasks_done"] == 3
    events = rd.read_events()
    assert [e["task"] for e in events] == [0, 1, 2]
    assert [len(e["per_task"]) for e in events] == [1, 2, 3]
    a = matrix(rd)
    assert a.shape == (3, 3) and np.isnan(a[0, 1]) and not np.isnan(a[2, 0])
    # 12 classes, 4 per task: the frozen embedded ViT is far above chance on the first task
    assert events[0]["acc"] > 50.0
    assert s["metrics"]["last_acc"] == pytest.approx(simplecil_by_hand(), abs=1e-3)
    for f in ("environment.json", "protocol.json", "sample_counts.csv", "top1_hits.csv", "top5_hits.csv"):
        assert (rd.path / f).exists(), f
    assert s["code_version"] and s["code"]["sources_sha256"] and "forgetting_pilot" in s["metric_definitions"]


def simplecil_by_hand() -> float:
    """SimpleCIL's last accuracy on tiny-3 computed here: class means of the frozen CLS features of the
    un-augmented training images, cosine to every test feature, top-1 over all 48 test images."""
    import torch
    import torch.nn.functional as F

    from cilbench.backbones.loader import BackboneConfig, load_backbone
    from cilbench.benchmark import get_benchmark
    from cilbench.data.sources import load_splits
    from cilbench.data.transforms import to_float   # read() may hand uint8 pixels

    spec = get_benchmark("tiny-3")
    train, test = load_splits(spec.dataset, None)
    vit = load_backbone(BackboneConfig()).eval()
    gen = torch.Generator()

    def features(split):
        images, keys = zip(*split.read(np.arange(len(split)), 64, False, gen))
        with torch.no_grad():
            return vit(to_float(torch.cat(images))), torch.as_tensor(split.targets)[torch.cat(keys)]
    ftr, ytr = features(train)
    fte, yte = features(test)
    protos = torch.stack([ftr[ytr == c].mean(0) for c in range(12)])
    pred = (F.normalize(fte, dim=1) @ F.normalize(protos, dim=1).T).argmax(1)
    return 100.0 * (pred == yte).float().mean().item()


def test_same_seed_same_numbers(tmp_path):
    a = matrix(run("finetune", tmp_path, name="a", sets=["method.epochs=1"]))
    b = matrix(run("finetune", tmp_path, name="b", sets=["method.epochs=1"]))
    np.testing.assert_array_equal(a, b)


def test_finished_run_is_not_overwritten(tmp_path):
    from cilbench.errors import CilbenchError

    run("simplecil", tmp_path)
    with pytest.raises(CilbenchError, match="already finished"):
        run("simplecil", tmp_path)
    assert run("simplecil", tmp_path, force=True).status() == "finished"


class StopAfter(Reporter):
    """A reporter that simulates a crash right after task ``t`` was checkpointed."""

    def __init__(self, t):
        self.t = t

    def __call__(self, n_tasks):
        return self

    def end_task(self, t, line):
        if t == self.t:
            raise KeyboardInterrupt


RESUME_SETS = {"simplecil": [], "finetune": ["method.epochs=1"],
               "care": ["method.tuned_epoch=2", "method.crct_epochs=1"], "rwf": [], "samoe": ["method.epochs=1"],
               "l2p": ["method.epochs=1"], "dualprompt": ["method.epochs=1"], "coda-prompt": ["method.epochs=1"],
               "aper": ["method.tuned_epoch=1"], "joint": ["method.epochs=1"]}


@pytest.mark.parametrize("method", sorted(RESUME_SETS))
def test_resume_gives_the_uninterrupted_matrix(tmp_path, method):
    sets = RESUME_SETS[method]
    full = matrix(run(method, tmp_path, name="full", sets=sets))
    r = resolve(RunRequest(method, "tiny-3", out=str(tmp_path), name="cut", sets=sets))
    with pytest.raises(KeyboardInterrupt):
        execute(r, StopAfter(1))
    rd = execute(resolve(RunRequest(method, "tiny-3", out=str(tmp_path), name="cut", sets=sets)))
    assert [e["task"] for e in rd.read_events()] == [0, 1, 2]
    np.testing.assert_array_equal(matrix(rd), full)


def test_joint_final_is_evaluated_at_the_end_only(tmp_path):
    rd = run("joint", tmp_path, sets=["method.epochs=1"])
    events = rd.read_events()
    assert [e["acc"] is None for e in events] == [True, True, False]
    s = json.loads((rd.path / "summary.json").read_text())["metrics"]
    assert s["n_evaluated"] == 1 and s["avg_inc_acc"] == s["last_acc"]


def test_cli_errors_are_one_line_with_remedy(capsys, tmp_path):
    code = main(["run", "--method", "simplecl", "--bench", "tiny-3", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 2 and "unknown method 'simplecl'" in out and "did you mean" in out
    assert "Traceback" not in out


def test_cli_run_list_show(capsys, tmp_path):
    assert main(["run", "--method", "simplecil", "--bench", "tiny-3", "--out", str(tmp_path)]) == 0
    assert main(["show", str(tmp_path / "tiny-3__simplecil__s1993")]) == 0
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "simplecil" in out and "synth-301" in out and "finished" in out


def test_imagefolder_benchmark_end_to_end(tmp_path, bench_dir, monkeypatch):
    from tests.test_data import write_tree

    write_tree(tmp_path / "data", classes=("a", "b", "c", "d"), per_class=(3, 2), size=48)
    (bench_dir / "toyfolder.toml").write_text(
        '[dataset.toy]\ndisplay = "Toy folder"\nsource = "imagefolder"\nfolder = "toy"\n'
        'n_classes = 4\nimage_size = 32\n\n[benchmark.toy-2]\ndataset = "toy"\nincrement = 2\n')
    from cilbench.registry import BENCHMARKS
    from cilbench.benchmark import load_benchmark_files
    load_benchmark_files()
    assert "toy-2" in BENCHMARKS.names()
    r = resolve(RunRequest("simplecil", "toy-2", out=str(tmp_path / "res"), data_root=str(tmp_path / "data")))
    rd = execute(r)
    assert [e["task"] for e in rd.read_events()] == [0, 1]


def test_resume_under_other_code_is_refused_unless_allowed_and_then_records_both(tmp_path):
    from cilbench.errors import CilbenchError

    req = RunRequest("simplecil", "tiny-3", out=str(tmp_path), name="cut")
    with pytest.raises(KeyboardInterrupt):
        execute(resolve(req), StopAfter(1))
    env_file = tmp_path / "cut" / "environment.json"
    env = json.loads(env_file.read_text())
    env["code_history"][0]["code"] = {"package": "0.0.9", "sources_sha256": "0" * 64}    # as if started by other code
    env_file.write_text(json.dumps(env))
    with pytest.raises(CilbenchError, match=r"started under v0.0.9 src:0000000000; this is .* would mix the two"):
        execute(resolve(req))
    rd = execute(resolve(req), allow_code_change=True)
    history = json.loads(env_file.read_text())["code_history"]
    assert [h["from_task"] for h in history] == [1, 3] and history[0]["code"]["package"] == "0.0.9"
    assert json.loads((rd.path / "summary.json").read_text())["code_version"].startswith("v0.0.9 src:0000000000 -> ")
