"""Speed of one classifier-alignment SGD step over CaRE's 301 cosine heads (1,000 classes, d=128):
an optimizer over the per-task head tensors (as released) vs over one flat copy (what care.py does;
the same element-wise update).

    python benchmarks/perf/ca_step_speed.py
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from cilbench.methods.care import CosineHeads, cosine


def main(steps: int = 200) -> None:
    torch.manual_seed(0)
    fc = CosineHeads(128)
    for t in range(301):
        fc.add_task(100 if t == 0 else 3, "cpu")
    x, y = torch.randn(160 * steps, 128), torch.randint(0, 1000, (160 * steps,))
    flat = nn.Parameter(torch.cat([h.detach() for h in fc.heads]))
    for name, params, logits in (("per-head tensors", list(fc.parameters()), fc),
                                 ("one flat tensor", [flat], lambda xb: cosine(xb, flat))):
        opt = torch.optim.SGD(params, lr=0.005, momentum=0.9, weight_decay=5e-4)
        t0 = time.perf_counter()
        for xb, yb in zip(x.split(160), y.split(160)):
            loss = F.cross_entropy(20 * logits(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"{name}: {(time.perf_counter() - t0) / steps * 1e3:.2f} ms/step")


if __name__ == "__main__":
    main()
