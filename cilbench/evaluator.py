"""The one loop every method goes through (design spec §3).

For each task t: ``method.learn(task_t)``; then one pass over the union of the test sets of tasks
0..t, predictions split by task -> row t of the accuracy matrix; record top-1/top-5, timings, peak
memory and parameter counts; append one JSON line; write the checkpoint (atomically). A run resumed
from a checkpoint restores the method, the evaluator state and every RNG, so it reproduces the
uninterrupted run.
"""
from __future__ import annotations

import random
import resource
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from cilbench.data.stream import ClassIncrementalData
from cilbench.method import Method, OnlineProtocol, RunContext, Task
from cilbench.metrics import summarize
from cilbench.protocol import TaskSplit


@dataclass
class EvalState:
    n_tasks: int
    a: np.ndarray = field(init=False)            # (T, T) task accuracy matrix, NaN where undefined
    acc_all: np.ndarray = field(init=False)      # A_t
    top5_all: np.ndarray = field(init=False)
    tasks_done: int = 0
    learn_s_total: float = 0.0
    eval_s_total: float = 0.0

    def __post_init__(self):
        self.a = np.full((self.n_tasks, self.n_tasks), np.nan)
        self.acc_all = np.full(self.n_tasks, np.nan)
        self.top5_all = np.full(self.n_tasks, np.nan)

    def summary(self):
        d = self.tasks_done
        return summarize(self.a[:d, :d], self.acc_all[:d], self.top5_all[:d], self.n_tasks)


@torch.no_grad()
def evaluate(method: Method, data: ClassIncrementalData, splits: list[TaskSplit], n_seen: int,
             batch_size: int, device: torch.device) -> tuple[np.ndarray, float, float]:
    """Per-task top-1 (%) over tasks 0..t, overall top-1 and top-5 (%) over all seen classes."""
    correct1 = torch.zeros(n_seen, dtype=torch.long)
    correct5 = torch.zeros(n_seen, dtype=torch.long)
    counts = torch.zeros(n_seen, dtype=torch.long)  # images actually scored (skipped files excluded)
    for batch in data.test_view(n_seen, batch_size):
        logits = method.predict(batch.to(device)).float().cpu()
        if logits.shape != (len(batch.labels), n_seen):
            raise RuntimeError(f"{method.name}.predict returned {tuple(logits.shape)}, "
                               f"expected ({len(batch.labels)}, {n_seen})")
        labels = batch.labels.cpu()
        top = logits.topk(min(5, n_seen), dim=1).indices
        hit1 = top[:, 0] == labels
        hit5 = (top == labels[:, None]).any(1)
        correct1 += torch.bincount(labels[hit1], minlength=n_seen)
        correct5 += torch.bincount(labels[hit5], minlength=n_seen)
        counts += torch.bincount(labels, minlength=n_seen)
    per_task = np.array([100.0 * correct1[s.start:s.stop].sum().item() / max(1, counts[s.start:s.stop].sum().item())
                         for s in splits])
    total = max(1, counts.sum().item())
    return per_task, 100.0 * correct1.sum().item() / total, 100.0 * correct5.sum().item() / total


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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Evaluator:
    def __init__(self, method: Method, data: ClassIncrementalData, ctx: RunContext, eval_every: int = 1,
                 eval_batch_size: int = 256, run_dir=None, reporter=None, online: OnlineProtocol = OnlineProtocol()):
        self.method, self.data, self.ctx, self.online = method, data, ctx, online
        self.splits = data.splits
        self.eval_every, self.eval_batch_size = eval_every, eval_batch_size
        self.run_dir, self.reporter = run_dir, reporter
        self.state = EvalState(len(self.splits))

    # ---- resume -------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        s = self.state
        return {"tasks_done": s.tasks_done, "a": s.a, "acc_all": s.acc_all, "top5_all": s.top5_all,
                "learn_s_total": s.learn_s_total, "eval_s_total": s.eval_s_total, "method": self.method.state_dict(), "rng": rng_state()}

    def restore(self, ckpt: dict) -> None:
        s = self.state
        s.tasks_done, s.a, s.acc_all, s.top5_all = ckpt["tasks_done"], ckpt["a"], ckpt["acc_all"], ckpt["top5_all"]
        s.learn_s_total, s.eval_s_total = ckpt["learn_s_total"], ckpt["eval_s_total"]
        self.method.load_state_dict(ckpt["method"])
        set_rng_state(ckpt["rng"])

    # ---- the loop -----------------------------------------------------------------------
    def should_eval(self, t: int) -> bool:
        last = t == len(self.splits) - 1
        return last or ((t + 1) % self.eval_every == 0 and self.method.wants_eval(t, len(self.splits)))

    def run_task(self, t: int) -> dict:
        split = self.splits[t]
        task = Task(index=t, n_tasks=len(self.splits), start=split.start, stop=split.stop, data=self.data,
                    seed=self.ctx.seed, allow_past_data=self.method.uses_past_data, online=self.online)
        if self.ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.ctx.device)
        t0 = time.perf_counter()
        self.method.learn(task)
        learn_s = time.perf_counter() - t0
        event = {"task": t, "classes": [split.start, split.stop], "learn_s": round(learn_s, 3)}
        if self.should_eval(t):
            t1 = time.perf_counter()
            per_task, acc, top5 = evaluate(self.method, self.data, self.splits[: t + 1], split.stop,
                                           self.eval_batch_size, self.ctx.device)
            event["eval_s"] = round(time.perf_counter() - t1, 3)
            self.state.a[t, : t + 1] = per_task
            self.state.acc_all[t], self.state.top5_all[t] = acc, top5
            event.update(acc=round(acc, 4), top5=round(top5, 4), per_task=[round(x, 4) for x in per_task])
        else:
            event.update(eval_s=0.0, acc=None, top5=None, per_task=None)
        event["peak_mem_mb"] = round(peak_memory_mb(self.ctx.device), 1)
        event["cost"] = asdict(self.method.cost())
        self.state.tasks_done = t + 1
        self.state.learn_s_total += event["learn_s"]
        self.state.eval_s_total += event["eval_s"]
        return event
