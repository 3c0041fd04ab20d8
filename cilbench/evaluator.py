"""The one loop every method goes through (design spec §3).

For each task t: ``method.learn(task_t)``; then one pass over the union of the test sets of tasks
0..t -> row t of the stored record: per task, the images scored and the top-1 / top-5 hits, from
which every metric is derived (``cilbench.metrics``). The test images are scored in a seeded
shuffled order (``ClassIncrementalData.test_view``), so no batch is drawn from one task and a method
cannot read the task off its batch-mates. Non-finite logits stop the run. Timings, peak memory and
parameter counts (``trainable``: the parameters an optimizer stepped in the task) go into one
JSON line per task; the checkpoint is written atomically. A run resumed
from a checkpoint restores the method, the evaluator state and every RNG, so it reproduces the
uninterrupted run.
"""
from __future__ import annotations

import contextlib
import random
import resource
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from cilbench.data.stream import ClassIncrementalData
from cilbench.errors import CilbenchError
from cilbench.method import Method, OnlineProtocol, RunContext, Task
from cilbench.metrics import Record, percent
from cilbench.protocol import TaskSplit


@dataclass
class EvalState:
    """Per-cell counts of the run so far: n (images scored), c1 / c5 (top-1 / top-5 hits); NaN above
    the diagonal and on rows not evaluated."""

    n_tasks: int
    n: np.ndarray = field(init=False)
    c1: np.ndarray = field(init=False)
    c5: np.ndarray = field(init=False)
    tasks_done: int = 0
    learn_s_total: float = 0.0
    eval_s_total: float = 0.0

    def __post_init__(self):
        self.n, self.c1, self.c5 = (np.full((self.n_tasks, self.n_tasks), np.nan) for _ in range(3))

    def record(self) -> Record:
        d = self.tasks_done
        return Record.from_counts(self.n[:d, :d], self.c1[:d, :d], self.c5[:d, :d])


@dataclass(frozen=True)
class TaskScores:
    """One evaluation: per task j <= t, images scored and top-1 / top-5 hits."""

    n: np.ndarray
    c1: np.ndarray
    c5: np.ndarray

    @property
    def per_task(self) -> np.ndarray:
        return percent(self.c1, self.n)

    def overall(self, hits: np.ndarray) -> float:
        return 100.0 * hits.sum() / self.n.sum() if self.n.sum() else float("nan")


@torch.no_grad()
def evaluate(method: Method, data: ClassIncrementalData, splits: list[TaskSplit], n_seen: int,
             batch_size: int, device: torch.device, after_task: int = 0) -> TaskScores:
    """Score every test image of the seen classes; the counts per task of ``splits``."""
    correct1 = torch.zeros(n_seen, dtype=torch.long)
    correct5 = torch.zeros(n_seen, dtype=torch.long)
    counts = torch.zeros(n_seen, dtype=torch.long)  # images actually scored (skipped files excluded)
    with eval_mode(list(method.modules().values())):
        for batch in data.test_view(n_seen, batch_size):
            logits = method.predict(batch.to(device)).float().cpu()
            if logits.shape != (len(batch.labels), n_seen):
                raise RuntimeError(f"{method.name}.predict returned {tuple(logits.shape)}, "
                                   f"expected ({len(batch.labels)}, {n_seen})")
            bad = ~torch.isfinite(logits)
            if bad.any():
                raise CilbenchError(
                    f"{method.name} produced {int(bad.sum())} non-finite logits on {int(bad.any(1).sum())} of "
                    f"{len(logits)} test images after task {after_task + 1}; a diverged model has no accuracy",
                    "lower the method's learning rate (--set method.lr=...) or use run.precision=fp32; "
                    "the tasks before it are saved, --force starts over")
            labels = batch.labels.cpu()
            top = logits.topk(min(5, n_seen), dim=1).indices
            hit1 = top[:, 0] == labels
            hit5 = (top == labels[:, None]).any(1)
            correct1 += torch.bincount(labels[hit1], minlength=n_seen)
            correct5 += torch.bincount(labels[hit5], minlength=n_seen)
            counts += torch.bincount(labels, minlength=n_seen)
    per_split = lambda x: np.array([x[s.start:s.stop].sum().item() for s in splits], dtype=float)  # noqa: E731
    return TaskScores(per_split(counts), per_split(correct1), per_split(correct5))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def process_peak_rss_mb() -> float:
    """The process's peak resident memory so far (the whole run, not one task)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@contextlib.contextmanager
def stepped_parameters():
    """Collect the ids of the parameters any optimizer steps with a gradient inside the block: the
    parameters that really were trained, whatever loop or optimizer a method uses."""
    stepped: set[int] = set()

    def hook(opt, args, kwargs):
        stepped.update(id(p) for g in opt.param_groups for p in g["params"] if p.grad is not None)

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield stepped
    finally:
        handle.remove()


@contextlib.contextmanager
def eval_mode(modules):
    """Every module in eval mode (dropout off, batch statistics frozen) for the block, then each back
    to the mode it had: a method's prediction never depends on the mode it was left in."""
    modes = [(m, m.training) for root in modules for m in root.modules()]
    for root in modules:
        root.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class Evaluator:
    def __init__(self, method: Method, data: ClassIncrementalData, ctx: RunContext, eval_every: int = 1,
                 eval_batch_size: int = 256, online: OnlineProtocol = OnlineProtocol()):
        self.method, self.data, self.ctx, self.online = method, data, ctx, online
        self.splits = data.splits
        self.eval_every, self.eval_batch_size = eval_every, eval_batch_size
        self.state = EvalState(len(self.splits))

    # ---- resume -------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        s = self.state
        return {"tasks_done": s.tasks_done, "n": s.n, "c1": s.c1, "c5": s.c5,
                "learn_s_total": s.learn_s_total, "eval_s_total": s.eval_s_total,
                "method": self.method.state_dict(), "rng": rng_state()}

    def restore(self, ckpt: dict) -> None:
        if "n" not in ckpt:
            raise CilbenchError("the checkpoint predates per-cell sample counts and cannot be resumed",
                                "pass --force to start the run over")
        s = self.state
        s.tasks_done, s.n, s.c1, s.c5 = ckpt["tasks_done"], ckpt["n"], ckpt["c1"], ckpt["c5"]
        s.learn_s_total, s.eval_s_total = ckpt["learn_s_total"], ckpt["eval_s_total"]
        self.method.load_state_dict(ckpt["method"])
        set_rng_state(ckpt["rng"])

    # ---- the loop -----------------------------------------------------------------------
    def should_eval(self, t: int) -> bool:
        last = t == len(self.splits) - 1
        return last or ((t + 1) % self.eval_every == 0 and self.method.wants_eval(t, len(self.splits)))

    def run_task(self, t: int) -> dict:
        split = self.splits[t]
        task = Task(index=t, n_tasks=len(self.splits), start=split.start, stop=split.stop, data=self.data.training,
                    seed=self.ctx.seed, allow_past_data=self.method.uses_past_data, online=self.online)
        if self.ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.ctx.device)
        t0 = time.perf_counter()
        with stepped_parameters() as stepped:
            self.method.learn(task)
        learn_s = time.perf_counter() - t0
        event = {"task": t, "classes": [split.start, split.stop], "learn_s": round(learn_s, 3)}
        if self.should_eval(t):
            t1 = time.perf_counter()
            scores = evaluate(self.method, self.data, self.splits[: t + 1], split.stop,
                              self.eval_batch_size, self.ctx.device, after_task=t)
            event["eval_s"] = round(time.perf_counter() - t1, 3)
            s = self.state
            s.n[t, : t + 1], s.c1[t, : t + 1], s.c5[t, : t + 1] = scores.n, scores.c1, scores.c5
            empty = [j + 1 for j in np.flatnonzero(scores.n == 0)]
            if empty:
                self.ctx.reporter.log(f"warning: after task {t + 1}, task(s) {empty} had no scored test image; "
                                      "their accuracy is undefined (NaN) and left out of every mean")
            event.update(acc=_rounded(scores.overall(scores.c1)), top5=_rounded(scores.overall(scores.c5)),
                         per_task=[_rounded(x) for x in scores.per_task],
                         n=scores.n.astype(int).tolist(), correct=scores.c1.astype(int).tolist(),
                         correct5=scores.c5.astype(int).tolist())
        else:
            event.update(eval_s=0.0, acc=None, top5=None, per_task=None)
        if self.ctx.device.type == "cuda":
            event["peak_cuda_mem_mb"] = round(torch.cuda.max_memory_allocated(self.ctx.device) / 2**20, 1)
        event["process_peak_rss_mb"] = round(process_peak_rss_mb(), 1)
        event["cost"] = asdict(self.method.cost(stepped))
        self.state.tasks_done = t + 1
        self.state.learn_s_total += event["learn_s"]
        self.state.eval_s_total += event["eval_s"]
        return event


def _rounded(x: float) -> float | None:
    return None if x != x else round(float(x), 4)
