"""CaRE: Continual Learner with Bi-Level Routing Mixture of Experts (Lou, Fu, Yu; ICML 2026).

Faithful to the released code (``LMMMEng/CaRE`` d90800a) as described in spec methods.md §1:
- BR-MoE parallel to the MLP in every block (``methods/common/brmoe.py``); frozen backbone.
- Cosine classifier, one bias-free head per task, old heads stay in the optimizer.
- Loss: CosFace (scale s, margin m) on the current task's classes + mean over blocks of the
  auxiliary loss on the current perceptron: (hard + soft)/2, hard = CosFace(s·a) (or plain CE),
  soft = KL(softmax(q/τ) ‖ softmax(a/τ))·τ² with q the detached *unscaled* main cosines, τ = 1 for
  blocks with index < 6 and 2 after (``aux_tau = "released"``: the released code hard-codes 6 for a
  12-block ViT, so on the 4-block embedded ViT every block gets τ = 1); ``"half"`` (cilbench ≤ 0.1)
  uses τ = 1 in the first half of the blocks and 2 in the second. The two agree on ViT-B/16.
- Task 0: ``tuned_epoch`` epochs (cosine init_lr → min_lr). Task t ≥ 1: stage 1 (tuned_epoch//2
  epochs, init_lr → init_lr/2), class statistics + classifier alignment (CA), stage 2 (fresh SGD,
  init_lr/2 → min_lr), statistics again + CA. Each stage of t ≥ 1 re-anchors the shared adapter.
- Class statistics from the training-path forward (current router forced), test transform, fp32;
  mean and covariance (+1e-4·I) or diagonal variance. Old classes' statistics are never recomputed.
  Compact storage (``ca_stats = "lowrank"`` with ``ca_rank``, ``"shared"``, ``ca_dtype = "float16"``)
  is a cilbench option, see ``methods/common/class_gaussians.py``.
- CA: per seen class 5·batch pseudo-features from N(μ̃_c, Σ_c), CE(s·cos) over all seen classes, SGD
  ``ca_lr``, CosineAnnealingLR(T_max=5) whatever ``crct_epochs`` is. The draws are stacked class by
  class before the shuffle, as released (``ca_order = "class-major"``), so the same seed trains the
  heads on the same sequence of batches; ``"class-minor"`` is cilbench ≤ 0.1's order.
- ``decay`` scales sampling means with the released code's negative task size (default, to reproduce
  published numbers); ``decay_fix`` uses the intended per-task formula instead.
- ``dispatch = "sparse"`` (default) runs experts CLS-first and only the selected ones on all tokens;
  ``"dense"`` is the released every-expert-on-every-token path (equivalence: tests/test_care_sparse.py).
- Inference: single task-agnostic pass, or (``iter_pred``, 1 ≤ task ≤ ``max_iter_pred_task``) the
  iterative mode: one semi-dynamic pass per task id, keep the lowest-entropy one per sample, add the
  single-pass softmax.

Where cilbench still differs from the released code, and why:
- Sparse dispatch gives experts outside a router's top-K weight exactly 0 (``-inf``); the released
  ``-100`` fill gives them e^-100 of the mass, below float32 resolution unless a router's top logit
  is < ≈ -78. ``dispatch = "dense"`` keeps the ``-100``. Gradients are otherwise the released ones:
  the frozen experts' hidden states and the chosen routers' rows stay in the autograd graph (only
  the choice of routers and experts is made without gradient).
- Sparse dispatch draws dropout masks only where it computes (the CLS hidden states and the selected
  experts), so its random stream differs from the dense/released one (same distribution).
- CosFace is a stable log-sum-exp (``cosface``): equal wherever the released ``exp`` is finite; the
  released one overflows to inf/NaN once s·logit exceeds ≈ 88, which the unbounded perceptron
  latents can reach.
- Pseudo-features are drawn in one batched ``randn`` per chunk of classes through the Cholesky factor
  (``ClassGaussians.sample``) instead of one ``MultivariateNormal`` per class: the same normal draws in
  the same class-major order, without a per-class factorisation.
- Options the released code does not have: ``ca_stats`` other than covariance/variance,
  ``ca_dtype``, ``decay_fix``, ``expert_init = "all"``, ``entropy_norm``, ``aux_tau = "half"``,
  ``ca_order = "class-minor"``, ``dispatch = "sparse"`` (the default; same function as dense).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cilbench.backbones.vit import BlockHooks
from cilbench.config import bounded
from cilbench.data.base import Batch
from cilbench.engine import Schedule, fit
from cilbench.method import Method, Task
from cilbench.registry import register_method
from cilbench.methods.common.brmoe import BRMoE, BRMoEConfig, entropy
from cilbench.methods.common.class_gaussians import ClassGaussians


@dataclass(frozen=True)
class CaREConfig:
    tuned_epoch: int = bounded(20, 0)
    init_lr: float = bounded(0.01, 0.0)
    min_lr: float = 0.0
    batch_size: int = bounded(16, 1)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scale: float = 20.0
    margin: float = 0.0
    expert_dim: int = bounded(16, 1)
    adapter_dim: int = bounded(64, 1)
    topk_experts: int = bounded(3, 1)
    topk_routers: int = bounded(2, 1)
    dropout: float = bounded(0.1, 0.0, 1.0)
    ema_mu: float = bounded(0.999, 0.0, 1.0)
    aux_cos_loss: bool = True
    self_dist_loss: bool = True
    aux_weight: float = 1.0
    aux_tau: Literal["released", "half"] = "released"     # distillation temperature per block (docstring)
    crct_epochs: int = bounded(3, 0)
    ca_lr: float = 0.005
    ca_stats: Literal["covariance", "variance", "lowrank", "shared"] = "covariance"
    ca_rank: int = bounded(32, 1)                  # lowrank: principal directions kept per class
    ca_dtype: Literal["float32", "float16"] = "float32"   # storage of the covariance factors
    ca_samples_per_class: int = bounded(0, 0)      # 0 = 5 * batch_size (released)
    ca_order: Literal["class-major", "class-minor"] = "class-major"   # pseudo-feature stacking (released: major)
    decay: bool = True
    decay_fix: bool = False
    expert_init: Literal["released", "all"] = "released"
    entropy_norm: bool = False
    iter_pred: bool = True
    max_iter_pred_task: int = bounded(60, 0)
    dispatch: Literal["sparse", "dense"] = "sparse"   # dense = the released all-experts reference path


    def brmoe(self) -> BRMoEConfig:
        return BRMoEConfig(self.expert_dim, self.adapter_dim, self.topk_experts, self.topk_routers, self.dropout,
                           self.ema_mu, -100.0, self.expert_init, self.entropy_norm, self.dispatch)


def aux_temperatures(n_blocks: int, rule: str) -> list[float]:
    """τ of the self-distillation term per block: ``released`` 1 below block 6 and 2 from it (the
    released code's ``1 if idx < 6 else 2``), ``half`` 1 in the first half of the blocks and 2 after."""
    cut = 6 if rule == "released" else n_blocks / 2
    return [1.0 if i < cut else 2.0 for i in range(n_blocks)]


def stack_pseudo_features(draws: torch.Tensor, order: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, n, d) draws per class -> (C·n, d) features and their labels, stacked class by class
    (``class-major``, the released ``torch.cat`` over classes) or draw by draw (``class-minor``)."""
    c, n, d = draws.shape
    classes = torch.arange(c, device=draws.device)
    if order == "class-major":
        return draws.reshape(c * n, d), classes.repeat_interleave(n)
    return draws.transpose(0, 1).reshape(c * n, d), classes.repeat(n)


class CosineHeads(nn.Module):
    """Bias-free per-task heads; logits = cos(w_j, f) in [-1, 1] (TunaLinear)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.heads = nn.ParameterList()

    def add_task(self, n_classes: int, device) -> None:
        w = torch.empty(n_classes, self.dim, device=device)
        nn.init.trunc_normal_(w, std=0.02)
        self.heads.append(nn.Parameter(w))

    def weight(self) -> torch.Tensor:
        return torch.cat(list(self.heads), 0)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return cosine(feats, self.weight())


def cosine(feats: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.normalize(feats.float(), dim=1) @ F.normalize(weight, dim=1).T


class CaREHooks(BlockHooks):
    """Runs each block's BR-MoE beside its MLP for one forward (``task``: the routed task, None = task
    agnostic); each block's current-perceptron logits come back as a side output."""

    def __init__(self, moes: nn.ModuleList, task: int | None):
        self.moes, self.task = moes, task

    def parallel(self, i: int, z_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.moes[i](z_a, self.task)


def cosface(cos: torch.Tensor, y: torch.Tensor, s: float, m: float) -> torch.Tensor:
    """-log e^{s(z_y - m)} / (e^{s(z_y - m)} + Σ_{j≠y} e^{s z_j})."""
    return F.cross_entropy(s * (cos.float() - m * F.one_hot(y, cos.shape[1])), y)


def task_columns(logits: torch.Tensor, labels: torch.Tensor, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """(the logits of the task's classes, labels as positions among them): the new range as a slice,
    or with recurring classes (overlapping protocols) the task's label list in the global space."""
    if not task.recurring:
        return logits[:, task.start:task.stop], labels - task.start
    cols = torch.as_tensor(task.labels, device=logits.device)
    local = torch.full((task.stop,), -1, dtype=torch.long, device=labels.device)
    local[cols.to(labels.device)] = torch.arange(len(cols), device=labels.device)
    return logits.index_select(1, cols), local[labels]


def decay_factors(n_seen: int, known: int, total: int, cur_task: int, task_of_class: torch.Tensor,
                  fixed: bool) -> torch.Tensor:
    """Per-class mean scaling 0.9 + 0.1·(t_id + 1)/(cur + 1).

    Released: t_id = c // task_size with task_size = known - total (negative, Python floor division),
    which shrinks the newest classes most and can go negative on B100 Inc3. Fixed: t_id = the class's
    real task index (older tasks shrink more, the current task keeps 1.0).
    """
    c = torch.arange(n_seen)
    if fixed:
        t_id = task_of_class[:n_seen].double()
    else:
        t_id = torch.div(c, known - total, rounding_mode="floor").double()
    return 0.9 + (t_id + 1) / (cur_task + 1) * 0.1  # the released operation order, in float64


@register_method("care")
class CaRE(Method):
    """CaRE (ICML 2026): bi-level routing MoE adapters, faithful to the released code."""

    Config = CaREConfig
    added_settings: ClassVar[dict] = {"aux_tau": "half", "ca_order": "class-minor"}  # cilbench <= 0.1
    # method.amp merged into run.precision: amp=false is today's fp32; the released fp16 training is
    # run.precision=fp16 (autocast + GradScaler, through the engine)
    removed_settings: ClassVar[dict] = {"amp": False}
    state_attrs: ClassVar[tuple] = ("task_sizes", "local_sizes", "gaussians")

    @classmethod
    def online_passes(cls, cfg) -> int:
        return cfg.tuned_epoch + 1  # training stages, then the class-statistics pass

    def setup(self, backbone, info) -> None:
        super().setup(backbone, info)
        self.backbone.requires_grad_(False)
        dev = self.ctx.device
        self.moes = nn.ModuleList([BRMoE(backbone.embed_dim, self.cfg.brmoe()) for _ in range(backbone.depth)]).to(dev)
        self.fc = CosineHeads(backbone.embed_dim).to(dev)
        self.task_sizes: list[int] = []        # classes each task introduced (its head's rows)
        self.local_sizes: list[int] = []       # classes in each task's data (its perceptrons' outputs)
        self.gaussians = ClassGaussians(backbone.embed_dim, self.cfg.ca_stats, self.cfg.ca_rank, self.cfg.ca_dtype, dev)

    # ---- structure ------------------------------------------------------------------------
    @property
    def cur_task(self) -> int:
        return len(self.task_sizes) - 1

    def add_task(self, n_new: int, n_local: int) -> None:
        """A task's triplet per block (perceptrons over all ``n_local`` classes in its data, recurring
        ones included) and a head for the ``n_new`` classes it introduces."""
        for moe in self.moes:
            moe.add_task(n_local)
        self.fc.add_task(n_new, self.ctx.device)
        self.task_sizes.append(n_new)
        self.local_sizes.append(n_local)

    def features(self, images: torch.Tensor, task: int | None) -> torch.Tensor:
        return self.backbone(images, CaREHooks(self.moes, task))

    def features_and_latents(self, images: torch.Tensor, task: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The feature and each block's current-perceptron logits (the auxiliary loss's inputs)."""
        return self.backbone.forward_with_sides(images, CaREHooks(self.moes, task))

    def set_train(self, mode: bool) -> None:
        self.backbone.train(mode)
        self.moes.train(mode)
        self.fc.train(mode)

    # ---- learning -------------------------------------------------------------------------
    def learn(self, task: Task) -> None:
        self.add_task(len(task.classes), len(task.labels))
        c = self.cfg
        t = task.index
        if t == 0:
            self._train_stage(task, c.tuned_epoch, c.init_lr, c.min_lr)
            self._compute_stats(task)
            return
        half = c.tuned_epoch // 2
        self._train_stage(task, half, c.init_lr, c.init_lr / 2)
        self._compute_stats(task)
        self._align(task)
        self._train_stage(task, half, c.init_lr / 2, c.min_lr)
        self._compute_stats(task)
        self._align(task)

    def loss(self, batch: Batch, task: Task) -> torch.Tensor:
        c = self.cfg
        feats, latents = self.features_and_latents(batch.images, task.index)
        cur, y = task_columns(self.fc(feats), batch.labels, task)
        main = cosface(cur, y, c.scale, c.margin)
        taus = aux_temperatures(len(latents), c.aux_tau)
        teacher = cur.detach().float()
        aux = []
        for i, a in enumerate(latents):
            a = a.float()
            terms = [cosface(a, y, c.scale, c.margin) if c.aux_cos_loss else F.cross_entropy(a, y)]
            if c.self_dist_loss:
                tau = taus[i]
                terms.append(F.kl_div(F.log_softmax(a / tau, 1), F.softmax(teacher / tau, 1),
                                      reduction="batchmean") * tau * tau)
            aux.append(sum(terms) / len(terms))
        return main + c.aux_weight * torch.stack(aux).mean()

    def _train_stage(self, task: Task, epochs: int, lr: float, lr_end: float) -> None:
        if epochs <= 0:
            return
        c = self.cfg
        self.set_train(True)
        if task.index >= 1:
            for moe in self.moes:
                moe.snapshot_shared()
        adapter_params = [p for p in self.moes.parameters() if p.requires_grad]
        schedule = Schedule(epochs, lr, "sgd", c.momentum, c.weight_decay, cosine_to=lr_end, step_every="epoch")
        fit([{"params": adapter_params}, {"params": list(self.fc.parameters())}], task.train_loader(c.batch_size),
            lambda b: self.loss(b, task), schedule, self.ctx)
        self.set_train(False)

    @torch.no_grad()
    def _compute_stats(self, task: Task) -> None:
        self.set_train(False)
        feats, labels = [], []
        for batch in task.train_loader(self.cfg.batch_size * 4, shuffle=False, augment=False):
            batch = batch.to(self.ctx.device)
            feats.append(self.features(batch.images, task.index).float())
            labels.append(batch.labels)
        self.gaussians.fit(task.labels, torch.cat(feats), torch.cat(labels), task.index)

    def _sampling_means(self, task: Task) -> torch.Tensor:
        n = task.stop
        means = self.gaussians.means[:n]
        if not self.cfg.decay:
            return means
        task_of_class = torch.repeat_interleave(torch.arange(len(self.task_sizes)), torch.tensor(self.task_sizes))
        f = decay_factors(n, task.start, task.stop, task.index, task_of_class, self.cfg.decay_fix)
        return means * f.to(means)[:, None]

    def _align(self, task: Task) -> None:
        """Classifier alignment on pseudo-features sampled from the per-class Gaussians."""
        c = self.cfg
        self.set_train(False)
        per_class = c.ca_samples_per_class or 5 * c.batch_size
        mu = self._sampling_means(task).float()
        # SGD over all heads (released) on one flat copy: the same element-wise update, without
        # concatenating T head tensors and splitting their gradients at each of ~10^4 steps
        heads = list(self.fc.heads)
        flat = nn.Parameter(torch.cat([h.detach() for h in heads]))
        opt = torch.optim.SGD([flat], lr=c.ca_lr, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
        for _ in range(c.crct_epochs):
            # batched matmuls over stored factors, no per-sample copy of L_c (MultivariateNormal would)
            x, y = stack_pseudo_features(self.gaussians.sample(mu, per_class), c.ca_order)
            order = torch.randperm(len(x), device=x.device)
            x, y = x[order], y[order]
            for xb, yb in zip(x.split(5 * c.batch_size), y.split(5 * c.batch_size)):
                loss = F.cross_entropy(c.scale * cosine(xb, flat), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
        with torch.no_grad():
            for h, part in zip(heads, flat.split([len(h) for h in heads])):
                h.copy_(part)

    # ---- prediction -----------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        s = self.cfg.scale
        with self.ctx.autocast():
            single = s * self.fc(self.features(batch.images, None))
            t = self.cur_task
            if not (self.cfg.iter_pred and 1 <= t <= self.cfg.max_iter_pred_task):
                return single
            best, best_h = None, None
            for i in range(t + 1):
                logits = s * self.fc(self.features(batch.images, i))
                h = entropy(logits)
                if best is None:
                    best, best_h = logits, h
                else:
                    better = h < best_h
                    best = torch.where(better[:, None], logits, best)
                    best_h = torch.where(better, h, best_h)
            return best.softmax(1) + single.softmax(1)

    # ---- bookkeeping ----------------------------------------------------------------------
    def stored_tensors(self):
        return self.gaussians.tensors()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Add the saved tasks' triplets and heads first, so every tensor has its saved shape."""
        done = len(self.task_sizes)
        for n_new, n_local in zip(state["task_sizes"][done:], state["local_sizes"][done:]):
            self.add_task(n_new, n_local)
        super().load_state_dict(state)
