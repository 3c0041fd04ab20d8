"""Where sparse CaRE inference spends its time beyond the backbone: torch.profiler's op table for the
embedded tiny ViT at T = 301 tasks (random adapters), and the throughput ratio to the plain backbone.

    python benchmarks/perf/care_profile.py [--tasks 301] [--batch 256] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from cilbench.backbones.loader import BackboneConfig, load_backbone  # noqa: E402
from cilbench.methods.care import CaREHooks  # noqa: E402
from cilbench.methods.common.brmoe import BRMoE, BRMoEConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=301)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone = load_backbone(BackboneConfig()).eval()
    x = torch.rand(args.batch, 3, backbone.img_size, backbone.img_size)
    moes = nn.ModuleList([BRMoE(backbone.embed_dim, BRMoEConfig()) for _ in range(backbone.depth)])
    for t in range(args.tasks):
        for m in moes:
            m.add_task(100 if t == 0 else 3)
        with torch.no_grad():   # trained-looking adapters (a fresh expert's zero scale would be unrealistic)
            for m in moes:
                m.experts[-1].scale.normal_(0, 0.1)
    moes.eval()
    hooks = CaREHooks(moes, None)

    def care():
        backbone(x, hooks)

    with torch.no_grad():
        for _ in range(2):
            care()
            backbone(x)
        with profile() as prof:
            for _ in range(3):
                care()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        t0 = time.perf_counter()
        for _ in range(3):
            backbone(x)
        t1 = time.perf_counter()
        for _ in range(3):
            care()
        t2 = time.perf_counter()
    print(f"sparse CaRE at T={args.tasks}: {(t1 - t0) / (t2 - t1):.2f}x the backbone's throughput")


if __name__ == "__main__":
    main()
