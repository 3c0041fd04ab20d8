"""The one training engine: every gradient step of every method is taken by ``fit``.

``fit`` owns the protocol rules, so a method states what to optimise and how, never the loop:
- epochs offline; under the online protocol (a ``SinglePass`` stream) one pass with
  ``run.online_iters`` steps on each streamed batch, each a full step (a per-batch scheduler too);
- autocast under ``run.precision`` on CUDA, with a ``GradScaler`` for fp16 (bf16 needs none); the
  scaler is disabled elsewhere, where it is the identity;
- gradient-norm clipping (on unscaled gradients);
- the optimizer and learning-rate schedule of ``Schedule``: SGD or Adam, constant or cosine, the
  cosine stepped per batch step or per epoch, as each method's reference code does;
- an optimizer that persists across tasks (``optimizer=``: one made by ``Schedule.optimizer_for``);
- progress: the mean loss of each epoch (of each batch's last step) to the run's reporter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Sequence

import torch

from cilbench.data.base import Batch
from cilbench.method import RunContext

Params = Sequence[torch.nn.Parameter] | Sequence[dict]   # parameters, or optimizer parameter groups


@dataclass(frozen=True)
class Schedule:
    """How ``fit`` optimises: the optimizer, its learning-rate curve, epochs and clipping."""

    epochs: int
    lr: float
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.9                      # sgd
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)  # adam
    cosine_to: float | None = None             # None: constant lr; else cosine annealing down to it
    step_every: Literal["batch", "epoch"] = "epoch"   # when the cosine steps (T_max counts those steps)
    clip_grad: float = 0.0                     # gradient-norm clip; 0 = none

    def optimizer_for(self, params: Params) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.Adam(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)

    def scheduler_for(self, opt: torch.optim.Optimizer, passes: int, steps_per_pass: int):
        if self.cosine_to is None:
            return None
        t_max = passes * steps_per_pass if self.step_every == "batch" else passes
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, t_max), eta_min=self.cosine_to)


@dataclass
class FitResult:
    optimizer: torch.optim.Optimizer | None          # None only when the loader was empty
    steps: int = 0                                    # optimizer steps taken
    epoch_losses: list[float] = field(default_factory=list)   # mean loss of each pass


def fit(params: Params | Callable[[Batch], Params], loader: Iterable[Batch],
        loss_fn: Callable[[Batch], torch.Tensor | tuple[torch.Tensor, Any]], schedule: Schedule, ctx: RunContext,
        *, optimizer: torch.optim.Optimizer | None = None,
        on_batch: Callable[[int, Batch, Any], None] | None = None) -> FitResult:
    """Train ``params`` on ``loader`` by ``loss_fn``.

    ``params`` may be a function of the first batch (a method whose new parameters start from the
    task's first data: samoe's keys); ``optimizer`` continues an existing optimizer instead (its
    state carries over; its lr stays constant). ``loss_fn`` may return ``(loss, info)``;
    ``on_batch(epoch, batch, info)`` then sees each batch's last step. Methods that do not autocast
    (``Method.mixed_precision = False``) are refused any precision but fp32 before the run starts.
    """
    if optimizer is not None and schedule.cosine_to is not None:
        raise ValueError("a continued optimizer keeps a constant lr: drop cosine_to from its schedule")
    steps_per_batch = getattr(loader, "steps_per_batch", None)   # set on an online stream (SinglePass)
    passes = 1 if steps_per_batch is not None else schedule.epochs
    steps_per_batch = steps_per_batch or 1
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.precision == "fp16" and ctx.device.type == "cuda")
    result, sched = FitResult(optimizer), None
    clipped = [p for g in optimizer.param_groups for p in g["params"]] if optimizer is not None else []
    for epoch in range(passes):
        total, seen = 0.0, 0
        for batch in loader:
            batch = batch.to(ctx.device)
            if result.optimizer is None:
                result.optimizer = schedule.optimizer_for(params(batch) if callable(params) else params)
                clipped = [p for g in result.optimizer.param_groups for p in g["params"]]
                sched = schedule.scheduler_for(result.optimizer, passes, len(loader) * steps_per_batch)  # type: ignore[arg-type]
            opt = result.optimizer
            for _ in range(steps_per_batch):
                with ctx.autocast():
                    out = loss_fn(batch)
                loss, info = out if isinstance(out, tuple) else (out, None)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if schedule.clip_grad > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(clipped, schedule.clip_grad)
                scaler.step(opt)
                scaler.update()
                result.steps += 1
                if sched is not None and schedule.step_every == "batch":
                    sched.step()
            if on_batch is not None:
                on_batch(epoch, batch, info)
            total += loss.item() * len(batch.labels)
            seen += len(batch.labels)
        if sched is not None and schedule.step_every == "epoch":
            sched.step()
        result.epoch_losses.append(total / max(1, seen))
        ctx.reporter.epoch(epoch + 1, passes, result.epoch_losses[-1])
    return result
