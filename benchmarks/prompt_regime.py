"""Why prompt methods sit below SimpleCIL on the embedded default: the size of L2P's prompts next to
the tokens of the tiny ViT.

    python benchmarks/prompt_regime.py [--bench synth-10]

Prints, for the embedded ViT on the benchmark's test images: the number of patch tokens, the mean L2
norm of the CLS and patch tokens entering block 0 (after the position embedding), and the norm of an
L2P prompt token at its U(-1, 1) initialisation (√(d/3) in expectation), with the share of the
sequence the prompts take at L2P's pool settings (top-N × length). ViT-B/16 at 224 px has 196 patch
tokens, so the same 25 prompt tokens are 11 % of its sequence instead of 60 %.
"""
from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", default="synth-10")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--length", type=int, nargs="+", default=[1, 5])
    args = parser.parse_args()

    from cilbench.backbones.loader import load_backbone
    from cilbench.data.sources import load_splits
    from cilbench.data.stream import ClassIncrementalData
    from cilbench.runner import RunRequest, resolve

    r = resolve(RunRequest("l2p", args.bench))
    b = r.bench
    vit = load_backbone(r.backbone, normalize=b.dataset.normalize).eval()
    train, test = load_splits(b.dataset, None)
    data = ClassIncrementalData(train, test, b.n_classes, b.splits, b.order_seed)
    batch = next(iter(data.test_view(b.n_classes, 512)))
    with torch.no_grad():
        tokens = vit.embed(batch.images)                       # (B, 1 + patches, d) after pos-embed
    n = vit.num_prefix_tokens
    cls_norm = tokens[:, :n].norm(dim=-1).mean().item()
    patch_norm = tokens[:, n:].norm(dim=-1).mean().item()
    d = tokens.shape[-1]
    torch.manual_seed(0)
    prompt_norm = torch.empty(10_000, d).uniform_(-1, 1).norm(dim=-1).mean().item()
    patches = tokens.shape[1] - n
    print(f"embedded ViT on {args.bench}: width {d}, {patches} patch tokens, {len(batch.labels)} test images")
    print("| token | mean L2 norm |")
    print("|---|---|")
    print(f"| CLS (after position embedding) | {cls_norm:.2f} |")
    print(f"| patch | {patch_norm:.2f} |")
    print(f"| L2P prompt at U(-1, 1) init (√(d/3) = {(d / 3) ** 0.5:.2f}) | {prompt_norm:.2f} |")
    print()
    print("| prompt length | prompt tokens (top-N × length) | share of the tiny ViT's sequence | share at ViT-B/16 (196 patches) |")
    print("|---|---|---|---|")
    for length in args.length:
        p = args.top_k * length
        print(f"| {length} | {p} | {p / (p + patches + n):.0%} | {p / (p + 196 + 1):.0%} |")


if __name__ == "__main__":
    main()
