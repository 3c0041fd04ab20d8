"""The losses the methods share: cross-entropy in fp32 and the train-time class mask (every gradient
step goes through ``cilbench.engine.fit``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


def current_task_ce(logits: torch.Tensor, labels: torch.Tensor, task) -> torch.Tensor:
    """Cross-entropy under the train-time class mask: only the task's classes compete, the same as
    filling every other class's logit with -inf (L2P, DualPrompt, CODA-Prompt). With recurring
    classes (overlapping protocols) the mask is the task's label set in the global label space."""
    if not task.recurring:
        return F.cross_entropy(logits[:, task.start:task.stop].float(), labels - task.start)
    outside = torch.full((logits.shape[1],), float("-inf"), device=logits.device)
    outside[task.labels] = 0.0
    return F.cross_entropy(logits.float() + outside, labels)
