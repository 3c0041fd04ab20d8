"""Supervised training loops (SGD + cosine for the fine-tuning baselines and APER, Adam for the
prompt methods) and the class-masked loss, shared by the methods."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from cilbench.data.base import Batch
from cilbench.method import RunContext


@dataclass(frozen=True)
class SGDSchedule:
    epochs: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    min_lr: float = 0.0


def run_epochs(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], loader: Iterable[Batch],
               loss_fn: Callable[[Batch], torch.Tensor], epochs: int, ctx: RunContext, clip_grad: float = 0.0,
               batch_sched=None, epoch_sched=None) -> float:
    """The one supervised loop: ``epochs`` passes, optional gradient-norm clip, a scheduler stepped per
    batch and/or per epoch. An online stream (``SinglePass``) allows ``steps_per_batch`` gradient steps
    on each batch (``run.online_iters``), each a full step (the per-batch scheduler too). Returns the
    last epoch's mean loss (of each batch's last step)."""
    steps = getattr(loader, "steps_per_batch", 1)
    mean_loss = float("nan")
    for epoch in range(epochs):
        total, seen = 0.0, 0
        for batch in loader:
            batch = batch.to(ctx.device)
            for _ in range(steps):
                with ctx.autocast():
                    loss = loss_fn(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(params, clip_grad)
                opt.step()
                if batch_sched is not None:
                    batch_sched.step()
            total += loss.item() * len(batch.labels)
            seen += len(batch.labels)
        if epoch_sched is not None:
            epoch_sched.step()
        mean_loss = total / max(1, seen)
        ctx.reporter.epoch(epoch + 1, epochs, mean_loss)
    return mean_loss


def train_epochs(params: list[torch.nn.Parameter], loader: Iterable[Batch],
                 loss_fn: Callable[[Batch], torch.Tensor], sched: SGDSchedule, ctx: RunContext) -> float:
    """SGD with a per-batch cosine schedule for ``sched.epochs`` passes; returns the last epoch's mean loss."""
    opt = torch.optim.SGD(params, lr=sched.lr, momentum=sched.momentum, weight_decay=sched.weight_decay)
    steps = max(1, sched.epochs * len(loader) * getattr(loader, "steps_per_batch", 1))  # type: ignore[arg-type]
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=sched.min_lr)
    return run_epochs(opt, params, loader, loss_fn, sched.epochs, ctx, batch_sched=lr_sched)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


def adam_epochs(params: list[torch.nn.Parameter], loader: Iterable[Batch], loss_fn: Callable[[Batch], torch.Tensor],
                epochs: int, lr: float, ctx: RunContext, clip_grad: float = 0.0,
                cosine_min_lr: float | None = None) -> float:
    """The prompt methods' loop: a fresh Adam(0.9, 0.999) per call (the reference codes re-initialise
    it every task), constant lr or a per-epoch cosine to ``cosine_min_lr``, optional gradient-norm clip.
    Returns the last epoch's mean loss."""
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs), eta_min=cosine_min_lr)
             if cosine_min_lr is not None else None)
    return run_epochs(opt, params, loader, loss_fn, epochs, ctx, clip_grad, epoch_sched=sched)


def current_task_ce(logits: torch.Tensor, labels: torch.Tensor, task) -> torch.Tensor:
    """Cross-entropy under the train-time class mask: only the task's classes compete, the same as
    filling every other class's logit with -inf (L2P, DualPrompt, CODA-Prompt). With recurring
    classes (overlapping protocols) the mask is the task's label set in the global label space."""
    if not task.recurring:
        return F.cross_entropy(logits[:, task.start:task.stop].float(), labels - task.start)
    outside = torch.full((logits.shape[1],), float("-inf"), device=logits.device)
    outside[task.labels] = 0.0
    return F.cross_entropy(logits.float() + outside, labels)
