"""Per-sample feature cache for frozen networks.

Methods with a frozen feature extractor (SimpleCIL, APER's pre-trained half, L2P's query pass)
see the same test images after every task: on a 301-task run that is ~300 recomputations. The
cache stores features by (split, sample key) in growable tensors, so lookups stay vectorised.
Only un-augmented batches may be cached.
"""
from __future__ import annotations

from typing import Callable

import torch

from cilbench.data.base import Batch


class FeatureCache:
    def __init__(self, extract: Callable[[torch.Tensor], torch.Tensor]):
        self.extract = extract
        self._feats: dict[str, torch.Tensor] = {}
        self._have: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, batch: Batch) -> torch.Tensor:
        if batch.augmented:
            return self.extract(batch.images)
        keys = batch.keys.long()
        feats, have = self._feats.get(batch.split), self._have.get(batch.split)
        if feats is None or int(keys.max()) >= len(have):
            feats, have = self._grow(batch.split, int(keys.max()) + 1, batch)
        missing = ~have[keys]
        if missing.any():
            new = self.extract(batch.images[missing.to(batch.images.device)])
            feats[keys[missing]] = new.to(feats.device, feats.dtype)
            have[keys[missing]] = True
        return feats[keys].to(batch.images.device)

    def _grow(self, split: str, need: int, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        old, old_have = self._feats.get(split), self._have.get(split)
        size = max(need, 2 * (len(old_have) if old_have is not None else 0), 1024)
        if old is None:
            dim = self.extract(batch.images[:1]).shape[1]
            feats = torch.zeros(size, dim)
            have = torch.zeros(size, dtype=torch.bool)
        else:
            feats = torch.zeros(size, old.shape[1])
            have = torch.zeros(size, dtype=torch.bool)
            feats[: len(old)], have[: len(old_have)] = old, old_have
        self._feats[split], self._have[split] = feats, have
        return feats, have

    def clear(self) -> None:
        self._feats.clear()
        self._have.clear()
