"""Per-class feature Gaussians N(μ_c, Σ_c) for classifier alignment, with a choice of storage.

Full covariances are what CaRE (and SLCA, APER-style CA) release, but they cost C·d² numbers:
2.36 GB at 1,000 classes with ViT-B/16 (d = 768) in float32. Sampling only needs a square root of
Σ_c, so that is all that is kept:

- ``covariance``: the Cholesky factor of Σ_c + 1e-4·I (exact; C·d²).
- ``variance``: the diagonal only (the released code's other option; C·d).
- ``lowrank``: probabilistic PCA, the top-``rank`` principal directions plus an isotropic
  remainder that keeps the total variance (C·d·rank). A class with n ≤ rank + 1 training samples has a covariance of
  rank ≤ n − 1, so this is then exact.
- ``shared``: one pooled within-class covariance for all classes (d²), as in LDA.

``dtype = "float16"`` halves any of them; sampling always runs in float32.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch

Kind = Literal["covariance", "variance", "lowrank", "shared"]
RIDGE = 1e-4          # added to every covariance's diagonal (released: 1e-4·I)


class ClassGaussians:
    def __init__(self, dim: int, kind: Kind = "covariance", rank: int = 32, dtype: str = "float32",
                 device: torch.device | str = "cpu"):
        self.dim, self.kind, self.rank = dim, kind, rank
        self.dtype = {"float32": torch.float32, "float16": torch.float16}[dtype]
        self.device = torch.device(device)
        self.means = torch.zeros(0, dim, device=self.device)
        shape = {"covariance": (dim, dim), "variance": (dim,), "lowrank": (dim, rank), "shared": ()}[kind]
        self.scale = torch.zeros(0, *shape, dtype=self.dtype, device=self.device)
        self.noise = torch.zeros(0, device=self.device)                   # lowrank: isotropic std per class
        # shared: pooled scatter of finished tasks + of the task being fitted (refitted per stage)
        self._pooled = {"done": torch.zeros(dim, dim, dtype=torch.float64, device=self.device), "done_n": 0,
                        "cur": torch.zeros(dim, dim, dtype=torch.float64, device=self.device), "cur_n": 0,
                        "cur_task": -1}

    def __len__(self) -> int:
        return self.means.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        """Everything stored (what a method reports as its stored numbers)."""
        pooled = [self._pooled["done"], self._pooled["cur"]] if self.kind == "shared" else []
        return [self.means, self.scale, self.noise] + pooled

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def _grow(self, stop: int) -> None:
        if len(self) >= stop:
            return
        extra = stop - len(self)
        self.means = torch.cat([self.means, self.means.new_zeros(extra, self.dim)])
        self.scale = torch.cat([self.scale, self.scale.new_zeros(extra, *self.scale.shape[1:])])
        self.noise = torch.cat([self.noise, self.noise.new_zeros(extra)])

    @torch.no_grad()
    def fit(self, classes: Sequence[int], feats: torch.Tensor, labels: torch.Tensor, task: int) -> None:
        """(Re)fit the Gaussians of ``classes`` from features (n, d) of task ``task``'s data; a class
        that recurs in a later task is refitted from its newest images (old classes are otherwise never
        refitted, as released)."""
        self._grow(max(classes) + 1)
        feats = feats.float()
        if self.kind == "shared":
            scatter, count = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=feats.device), 0
        for c in classes:
            x = feats[labels == c]
            mu = x.mean(0)
            self.means[c] = mu
            xc = x - mu
            n = len(x)
            if self.kind == "covariance":
                cov = xc.T @ xc / max(1, n - 1) + RIDGE * torch.eye(self.dim, device=x.device)
                self.scale[c] = torch.linalg.cholesky(cov).to(self.dtype)
            elif self.kind == "variance":
                self.scale[c] = (xc.square().sum(0) / max(1, n - 1) + RIDGE).sqrt().to(self.dtype)
            elif self.kind == "lowrank":
                self.scale[c], self.noise[c] = self._lowrank(xc, n)
            else:
                scatter += (xc.T @ xc).double()
                count += max(0, n - 1)
        if self.kind == "shared":
            p = self._pooled
            if task != p["cur_task"]:                             # a new task: the last one is final
                p["done"], p["done_n"] = p["done"] + p["cur"], p["done_n"] + p["cur_n"]
            p["cur"], p["cur_n"], p["cur_task"] = scatter, count, task

    def _lowrank(self, xc: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilistic PCA of the sample covariance: σ² = mean of the eigenvalues past the top
        ``rank``, F = V_k·(Λ_k − σ²)^½, so FFᵀ + σ²I keeps the top eigenpairs and the total
        variance; the ridge is added to σ²."""
        _, s, vh = torch.linalg.svd(xc, full_matrices=False)          # eigenvalues s²/(n-1)
        lam = s.square() / max(1, n - 1)
        k = min(self.rank, lam.numel())
        rest = lam[k:].sum() / max(1, self.dim - k)
        factor = xc.new_zeros(self.dim, self.rank)
        factor[:, :k] = vh[:k].T * (lam[:k] - rest).clamp_min(0).sqrt()
        return factor.to(self.dtype), (rest + RIDGE).sqrt()

    def shared_factor(self) -> torch.Tensor:
        p = self._pooled
        n = max(1, p["done_n"] + p["cur_n"])
        cov = (p["done"] + p["cur"]) / n + RIDGE * torch.eye(self.dim, dtype=torch.float64, device=p["done"].device)
        return torch.linalg.cholesky(cov).float()

    def sample(self, means: torch.Tensor, per_class: int, chunk: int = 256) -> torch.Tensor:
        """(C, per_class, d) draws from N(means_c, Σ_c) for the first C = len(means) classes; the
        means may be the stored ones rescaled (CaRE's decay). Chunked over classes so float16
        factors are widened a chunk at a time."""
        n, d = means.shape
        shared = self.shared_factor() if self.kind == "shared" else None
        out = []
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            eps = torch.randn(hi - lo, per_class, d, device=means.device)
            if self.kind == "covariance":
                x = torch.bmm(eps, self.scale[lo:hi].float().transpose(1, 2))
            elif self.kind == "variance":
                x = eps * self.scale[lo:hi].float()[:, None]
            elif self.kind == "lowrank":
                z = torch.randn(hi - lo, per_class, self.rank, device=means.device)
                x = torch.bmm(z, self.scale[lo:hi].float().transpose(1, 2)) + eps * self.noise[lo:hi, None, None]
            else:
                x = eps @ shared.T
            out.append(x + means[lo:hi, None])
        return torch.cat(out)

    def covariance(self, c: int) -> torch.Tensor:
        """The covariance class c is sampled from (for tests and diagnostics)."""
        if self.kind == "covariance":
            f = self.scale[c].float()
            return f @ f.T
        if self.kind == "variance":
            return torch.diag(self.scale[c].float().square())
        if self.kind == "lowrank":
            f = self.scale[c].float()
            return f @ f.T + self.noise[c].square() * torch.eye(self.dim, device=f.device)
        f = self.shared_factor()
        return f @ f.T

    def state_dict(self) -> dict:
        return {"means": self.means.cpu(), "scale": self.scale.cpu(), "noise": self.noise.cpu(),
                "pooled": {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in self._pooled.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.means = state["means"].to(self.device)
        self.scale = state["scale"].to(self.device, self.dtype)
        self.noise = state["noise"].to(self.device)
        self._pooled = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in state["pooled"].items()}
        if "cur_start" in self._pooled:   # checkpoints before overlap support keyed the task by its first class
            self._pooled["cur_task"] = -1 - self._pooled.pop("cur_start")   # never a task index: the next fit folds
