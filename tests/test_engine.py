"""The training engine and the one-file method contract (issue 18).

Optimizer steps are counted with torch's global optimizer-step hook and streamed batches by wrapping
``SinglePass``: both outside the engine, so a method with a private loop would be caught."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from cilbench.data.base import SinglePass
from cilbench.errors import ConfigError
from cilbench.method import OnlineProtocol
from cilbench.registry import METHODS
from cilbench.runner import RunRequest, resolve
from tests.helpers import make_method, tiny_data

ONLINE_CAPABLE = {"finetune", "l2p", "dualprompt", "coda-prompt", "samoe", "rwf"}   # at least these


def online_method(name: str, iters: int):
    """``name`` resolved for the online protocol on tiny-3 with one epoch, or None when refused."""
    fields = METHODS.get(name).Config.__dataclass_fields__
    sets = [f"run.online_iters={iters}"] + [f"method.{k}=1" for k in ("epochs",) if k in fields]
    try:
        r = resolve(RunRequest(name, "tiny-3", online=True, sets=sets))
    except ConfigError:
        return None
    torch.manual_seed(0)
    return make_method(r.method_cls, r.method_cfg, backbone=r.backbone,
                       online=OnlineProtocol(True, r.run.online_batch_size, r.run.online_iters))


def steps_and_batches(monkeypatch, method, tasks):
    steps, batches, original = [0], [0], SinglePass.__iter__

    def counted(self):
        for batch in original(self):
            batches[0] += 1
            yield batch
    monkeypatch.setattr(SinglePass, "__iter__", counted)
    handle = register_optimizer_step_pre_hook(lambda *a: steps.__setitem__(0, steps[0] + 1))
    try:
        for task in tasks[:2]:
            method.learn(task)
    finally:
        handle.remove()
    return steps[0], batches[0]


def test_every_online_method_takes_exactly_iters_steps_per_streamed_batch(monkeypatch):
    checked = []
    for name in METHODS.names():
        if not METHODS.get(name).takes_gradient_steps:    # simplecil: run.online_iters > 1 is refused
            continue
        for iters in (1, 3):
            built = online_method(name, iters)
            if built is None:
                break
            steps, batches = steps_and_batches(monkeypatch, *built)
            assert batches > 0 and steps == iters * batches, (name, iters, steps, batches)
        else:
            checked.append(name)
    assert ONLINE_CAPABLE <= set(checked), checked


@pytest.mark.parametrize("name", sorted(ONLINE_CAPABLE))
def test_online_iters_change_what_a_method_learns(name):
    batch = next(iter(tiny_data().test_view(4, 16)))
    logits = []
    for iters in (1, 4):
        method, tasks = online_method(name, iters)
        method.learn(tasks[0])
        with torch.no_grad():
            logits.append(method.predict(batch))
    assert not torch.allclose(logits[0], logits[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: fp16 autocast needs a GPU")
@pytest.mark.parametrize("precision, scaled", [("fp16", True), ("bf16", False)])
def test_fp16_on_cuda_trains_through_a_grad_scaler(monkeypatch, precision, scaled):
    from cilbench.engine import Schedule, fit
    from cilbench.method import RunContext

    used, original = [], torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "scale", lambda self, out: used.append(self.is_enabled()) or
                        original(self, out))
    w = torch.nn.Parameter(torch.randn(8, 4, device="cuda"))
    view = tiny_data().training.task_view(0, 8, True, False, 0)
    result = fit([w], view, lambda b: (b.images.flatten(1)[:, :8] @ w).float().square().mean(), Schedule(1, 0.01),
                 RunContext(device=torch.device("cuda"), precision=precision))
    assert used == [scaled] * result.steps and torch.isfinite(w).all()


def test_the_evaluator_counts_trainable_as_the_parameters_an_optimizer_stepped():
    from cilbench.evaluator import Evaluator
    from cilbench.method import RunContext

    r = resolve(RunRequest("l2p", "tiny-3", sets=["method.epochs=1"]))
    method, _ = make_method(r.method_cls, r.method_cfg)
    event = Evaluator(method, tiny_data(), RunContext(seed=0)).run_task(0)
    d, m = method.backbone.embed_dim, r.method_cfg.pool_size
    # prompts (M, L, d) + keys (M, d) + head rows of the first task's 4 classes (weight and bias)
    assert event["cost"]["trainable"] == m * r.method_cfg.prompt_length * d + m * d + 4 * d + 4
    assert event["process_peak_rss_mb"] > 0 and "peak_cuda_mem_mb" not in event


def test_a_task_reaches_training_data_only():
    from cilbench.data.base import ImageSplit

    _, tasks = make_method(METHODS.get("simplecil"), METHODS.get("simplecil").Config())
    data = tasks[0].data
    assert not any(hasattr(data, name) for name in ("test", "test_view", "_test_index"))
    assert [v for v in vars(data).values() if isinstance(v, ImageSplit)] == [data.train]


def test_predict_runs_in_eval_mode_and_the_modes_are_restored():
    from cilbench.evaluator import evaluate

    data = tiny_data()
    method, _ = make_method(METHODS.get("simplecil"), METHODS.get("simplecil").Config())
    method.learn(_[0])
    modes, original = [], method.predict

    def spy(batch):
        modes.append([m.training for m in method.modules().values()])
        return original(batch)
    method.predict = spy
    method.backbone.train()
    evaluate(method, data, data.splits[:1], 4, 16, torch.device("cpu"))
    assert modes and not any(any(m) for m in modes)
    assert method.backbone.training                       # put back as it was


PROBE = '''
"""A linear probe on the frozen CLS feature: a third-party cilbench method in one file."""
from dataclasses import dataclass
import torch
from cilbench.config import bounded
from cilbench.engine import Schedule, fit
from cilbench.method import Method
from cilbench.registry import register_method

@dataclass(frozen=True)
class ProbeConfig:
    lr: float = bounded(0.05, 0.0)
    epochs: int = bounded(2, 1)

@register_method("probe")
class Probe(Method):
    """Linear probe over all classes of the benchmark, masked to the classes seen so far."""
    Config = ProbeConfig
    state_attrs = ("seen",)

    def setup(self, backbone, info):
        super().setup(backbone, info)
        self.backbone.requires_grad_(False)
        self.head, self.seen = torch.nn.Linear(backbone.embed_dim, info.n_classes), 0

    def learn(self, task):
        self.seen = task.stop
        loss = lambda b: torch.nn.functional.cross_entropy(self.predict(b), b.labels)
        fit(list(self.head.parameters()), task.train_loader(16), loss, Schedule(self.cfg.epochs, self.cfg.lr), self.ctx)

    def predict(self, batch):
        return self.head(self.backbone(batch.images))[:, :self.seen]
'''


def install(root: Path, module: str, source: str) -> dict:
    """``source`` as an installed third-party distribution: the module and a dist-info naming it in the
    ``cilbench.methods`` entry-point group; returns the environment that sees it."""
    root.mkdir(parents=True)
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[cilbench.methods]\n{module} = {module}\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}


def test_a_one_file_method_from_outside_runs_with_cost_columns_and_resumes(tmp_path):
    code = [line for line in PROBE.strip().splitlines() if line.strip()]
    assert len(code) <= 30
    env = install(tmp_path / "site", "cilbench_probe", PROBE)
    cmd = [sys.executable, "-m", "cilbench.cli", "run", "--method", "probe", "--bench", "tiny-6", "--out",
           str(tmp_path / "out")]
    whole = subprocess.run(cmd + ["--name", "whole"], env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    cut = subprocess.run(cmd + ["--name", "cut"], env={**env, "CILBENCH_KILL_AT": "train:5"})
    assert cut.returncode == -9
    resumed = subprocess.run(cmd + ["--name", "cut"], env=env, capture_output=True, text=True)
    out = tmp_path / "out"
    assert resumed.returncode == 0 and "resumed after task 2" in (out / "cut" / "log.txt").read_text()
    for name in ("top1_hits.csv", "sample_counts.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out / "whole" / name), pd.read_csv(out / "cut" / name))
    from cilbench.backbones.loader import BackboneConfig, load_backbone

    vit = sum(p.numel() for p in load_backbone(BackboneConfig()).parameters())
    head = 12 * vit_dim() + 12                                  # tiny-6 has 12 classes
    cost = json.loads((out / "whole" / "summary.json").read_text())["cost"]
    assert cost == {"total": vit + head, "trainable": head, "added": head, "stored": 0}


def vit_dim() -> int:
    from cilbench.backbones.loader import BackboneConfig, load_backbone

    return load_backbone(BackboneConfig()).embed_dim


PROMPT_METHOD = '''
"""A new prompt method on the toolkit: one learned prefix per task, picked by the nearest key."""
from dataclasses import dataclass
import torch
from cilbench.methods.common.prompts import PrefixHooks, PromptMethod
from cilbench.registry import register_method

@dataclass(frozen=True)
class KeyedPrefixConfig:
    lr: float = 0.01
    batch_size: int = 16
    epochs: int = 1

@register_method("keyed-prefix")
class KeyedPrefix(PromptMethod):
    """A (key, value) prefix in block 0 per task; the query's nearest task key picks it."""
    Config = KeyedPrefixConfig

    def build(self, backbone, info):
        d, t = backbone.embed_dim, info.n_tasks
        self.prefix = torch.nn.Parameter(torch.empty(t, 2, 2, d).uniform_(-1, 1))   # (task, key/value, L=2, d)
        self.keys = torch.nn.Parameter(torch.empty(t, d).uniform_(-1, 1))

    def forward(self, batch, task):
        sim = torch.nn.functional.cosine_similarity(self.queries(batch)[:, None], self.keys[None], dim=2)
        idx = sim.argmax(1) if task is None else torch.full((len(sim),), task.index)
        hooks = PrefixHooks({0: self.prefix[idx]})
        pull = sim.gather(1, idx[:, None]).mean() if task is not None else None
        return self.head(self.backbone(batch.images, hooks)), pull
'''


def test_a_new_prompt_method_is_under_sixty_lines_and_runs(tmp_path):
    code = [line for line in PROMPT_METHOD.strip().splitlines() if line.strip()]
    assert len(code) <= 60
    env = install(tmp_path / "site", "keyed_prefix", PROMPT_METHOD)
    proc = subprocess.run([sys.executable, "-m", "cilbench.cli", "run", "--method", "keyed-prefix", "--bench",
                           "tiny-3", "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(next((tmp_path / "out").glob("*/summary.json")).read_text())
    d = vit_dim()
    assert summary["cost"]["trainable"] == 3 * 2 * 2 * d + 3 * d + 12 * d + 12   # prefixes, keys, head
    assert summary["metrics"]["last_acc"] > 100 / 12                          # above chance


def test_a_user_package_named_methods_neither_shadows_nor_is_shadowed(tmp_path):
    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / "__init__.py").write_text("MINE = True\n")
    probe = ("import methods, cilbench.registry as r; assert methods.MINE; "
             "print(sorted(r.METHODS.names()))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert {"care", "simplecil", "l2p"} <= set(eval(proc.stdout))


def test_config_bounds_are_declared_once_and_checked_by_build():
    from cilbench.config import build

    for name in METHODS.names():
        cls = METHODS.get(name).Config
        for f in dataclasses.fields(cls):
            lo, hi = f.metadata.get("bounds", (None, None))
            if isinstance(lo, (int, float)) and not isinstance(f.default, (bool, str)):
                with pytest.raises(ConfigError, match=f"method.{f.name} = .* is out of range"):
                    below = lo - 2 if f.type in ("int", "int | None") else lo - 0.5
                    build(cls, [("test", {f.name: below})])
