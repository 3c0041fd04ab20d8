"""Memory of CaRE's class statistics (classifier alignment) for each storage option.

Fits ClassGaussians on random features for C classes of dimension d (default: 1,000 classes,
ViT-B/16's d = 768, 50 samples per class) and reports the bytes held, next to the theoretical
C·d² float32 of full covariances. Writes a CSV.

    python benchmarks/perf/class_stats_memory.py --out results/perf
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from cilbench.methods.common.class_gaussians import ClassGaussians

OPTIONS = [("covariance", "float32"), ("covariance", "float16"), ("lowrank", "float32"), ("lowrank", "float16"),
           ("shared", "float32"), ("variance", "float32")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--out", default="runs/perf", help="default runs/perf; results/perf holds the reference tables")
    a = p.parse_args()
    torch.manual_seed(0)
    rows = []
    full = a.classes * a.dim * a.dim * 4
    for kind, dtype in OPTIONS:
        g = ClassGaussians(a.dim, kind, a.rank, dtype)
        for lo in range(0, a.classes, 100):       # fit task by task, as CaRE does
            hi = min(a.classes, lo + 100)
            feats = torch.randn((hi - lo) * a.per_class, a.dim)
            g.fit(range(lo, hi), feats, torch.arange(lo, hi).repeat_interleave(a.per_class))
        rows.append(dict(storage=kind, dtype=dtype, rank=a.rank if kind == "lowrank" else None,
                         classes=a.classes, dim=a.dim, mb=g.nbytes() / 1e6, vs_full_covariance=g.nbytes() / full))
        print(f"{kind:10s} {dtype:8s} {g.nbytes() / 1e6:10.1f} MB  ({g.nbytes() / full:.4f} of C·d² float32)", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "class_stats_memory.csv", index=False, float_format="%.4g")
    print(f"wrote {out / 'class_stats_memory.csv'}")


if __name__ == "__main__":
    main()
