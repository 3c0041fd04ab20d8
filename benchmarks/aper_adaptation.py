"""How far APER's first-task adaptation moves the features on a benchmark, per learning rate.

    python benchmarks/aper_adaptation.py --bench synth-10 --variant adapter --lr 0.01 0.05 0.2

For each learning rate: adapt on task 1 exactly as ``cilbench run --method aper`` does (same resolved
settings, seed 1993), then report the mean cosine between the adapted and the pre-trained CLS features
of the first task's test images (1.0 = the adapter did nothing, APER then equals SimpleCIL) and how
far the adapted model's class means separate the task's test images (nearest-class-mean top-1 on the
adapted half alone). Prints one table.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def measure(bench: str, variant: str, lr: float, threads: int) -> dict:
    from cilbench.backbones.loader import load_backbone
    from cilbench.data.sources import load_splits
    from cilbench.data.stream import ClassIncrementalData
    from cilbench.evaluator import seed_everything
    from cilbench.method import BenchmarkInfo, RunContext, Task
    from cilbench.runner import RunRequest, resolve

    torch.set_num_threads(threads)
    r = resolve(RunRequest("aper", bench, sets=[f"method.variant={variant}", f"method.init_lr={lr}"]))
    seed_everything(r.run.seed)
    b = r.bench
    train, test = load_splits(b.dataset, None)
    data = ClassIncrementalData(train, test, b.n_classes, b.splits, b.order_seed)
    method = r.method_cls(r.method_cfg, RunContext(seed=r.run.seed))
    method.setup(load_backbone(r.backbone, normalize=b.dataset.normalize),
                 BenchmarkInfo(b.name, b.n_classes, len(b.splits), tuple(len(s) for s in b.splits),
                               b.dataset.image_size))
    s = b.splits[0]
    method.learn(Task(0, len(b.splits), s.start, s.stop, data, seed=r.run.seed))
    with torch.no_grad():
        pre, ada, labels = [], [], []
        for batch in data.test_view(s.stop, 256):
            pre.append(method.backbone(batch.images))
            ada.append(method.adapted(batch.images))
            labels.append(batch.labels)
        pre, ada, labels = torch.cat(pre), torch.cat(ada), torch.cat(labels)
        cos = F.cosine_similarity(pre, ada, dim=1).mean().item()

        def ncm(feats):
            means = torch.stack([feats[labels == c].mean(0) for c in range(s.stop)])
            pred = (F.normalize(feats, dim=1) @ F.normalize(means, dim=1).T).argmax(1)
            return 100.0 * (pred == labels).float().mean().item()
    return {"lr": lr, "cos(adapted, pre-trained)": cos, "NCM top-1 pre-trained": ncm(pre), "NCM top-1 adapted": ncm(ada)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", default="synth-10")
    parser.add_argument("--variant", default="adapter")
    parser.add_argument("--lr", type=float, nargs="+", default=[0.01, 0.05, 0.2])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    rows = [measure(args.bench, args.variant, lr, args.threads) for lr in args.lr]
    cols = list(rows[0])
    print(f"APER-{args.variant} on {args.bench}, first-task adaptation (test images of task 1)")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.5f}" if c.startswith("cos") else f"{row[c]:g}" if c == "lr"
                                 else f"{row[c]:.2f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
