"""CaRE throughput vs number of tasks T: dense (released) vs sparse dispatch vs the plain backbone.

For each architecture (the embedded tiny ViT, ViT-B/16 with random weights) and each T, measures
images/second of CaRE inference (task-agnostic single pass) and of one training step (current task
T-1, forward + backward + SGD step on the trainable parameters), plus the plain backbone's inference
and full fine-tuning step (timed again next to every CaRE measurement; ratios use that). It also
records the bytes autograd saves for backward in a CaRE training step, split into activations and parameter-like tensors (parameters and their cached stacks).
Synthetic inputs; CPU by default (``--device cuda`` on a GPU). Writes a CSV and a plot.

    python benchmarks/perf/care_speed.py --out results/perf
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from cilbench.backbones.loader import BackboneConfig, load_backbone
from cilbench.report import _save, plt  # noqa: F401  (headless matplotlib + atomic PNG/SVG)
from cilbench.methods.care import CaREHooks
from cilbench.methods.common.brmoe import BRMoE, BRMoEConfig

ARCHS = {"tiny": ("embedded-tiny", 32), "vitb": ("vit_base_patch16_224", 224)}


def timed(fn, repeats: int, device: torch.device) -> float:
    """Best of ``repeats`` timed calls after one warm-up (which also fills the sparse caches):
    the minimum is the least disturbed by other load, as in ``timeit``."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def saved_bytes(fn, param_ptrs: set[int]) -> tuple[int, int]:
    """(activation bytes, parameter-like bytes) saved for backward while running ``fn``."""
    acts, params = [0], [0]

    def pack(t: torch.Tensor):
        size = t.numel() * t.element_size()
        (params if t.untyped_storage().data_ptr() in param_ptrs else acts)[0] += size
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return acts[0], params[0]


def set_dispatch(moes: nn.ModuleList, dispatch: str) -> None:
    for m in moes:
        m.cfg = dataclasses.replace(m.cfg, dispatch=dispatch)
        m._cache.clear()


def run_arch(arch: str, tasks: list[int], batch: int, device: torch.device, repeats: int,
             max_dense_gb: float, rows: list[dict], paths: tuple[str, ...] = ("sparse", "dense"),
             modes: tuple[str, ...] = ("inference", "train")) -> None:
    name, size = ARCHS[arch]
    torch.manual_seed(0)
    backbone = load_backbone(BackboneConfig(name, weights="none")).to(device).eval()
    x = torch.rand(batch, 3, size, size, device=device)
    d, depth = backbone.embed_dim, backbone.depth
    n_tokens = backbone.vit.patch_embed.num_patches + backbone.num_prefix_tokens

    with torch.no_grad():
        plain_inf = batch / timed(lambda: backbone(x), repeats, device)
    head = nn.Linear(d, 10).to(device)
    opt = torch.optim.SGD(list(backbone.parameters()) + list(head.parameters()), lr=1e-4)

    def plain_step():
        opt.zero_grad(set_to_none=True)
        head(backbone(x)).square().mean().backward()
        opt.step()

    backbone.train()
    plain_train = batch / timed(plain_step, repeats, device)
    backbone.eval().requires_grad_(False)
    rows.append(dict(arch=arch, T=0, batch=batch, mode="inference", path="backbone", img_per_s=plain_inf))
    rows.append(dict(arch=arch, T=0, batch=batch, mode="train", path="backbone", img_per_s=plain_train))
    print(f"[{arch}] backbone: inference {plain_inf:.1f} img/s, fine-tune step {plain_train:.1f} img/s", flush=True)

    moes = nn.ModuleList([BRMoE(d, BRMoEConfig()) for _ in range(depth)]).to(device)
    for target in tasks:
        while moes[0].n_tasks < target:
            for m in moes:
                m.add_task(10)
        with torch.no_grad():  # trained-looking adapters (a fresh expert's zero scale would be unrealistic)
            for m in moes:
                m.experts[-1].scale.normal_(0, 0.1)
        params = [p for p in moes.parameters() if p.requires_grad]
        step_opt = torch.optim.SGD(params, lr=1e-4)
        for dispatch in paths:
            set_dispatch(moes, dispatch)
            stack_gb = batch * target * n_tokens * d * 4 / 2**30   # one block's (B, T, N, d) stack
            for mode in modes:
                row = dict(arch=arch, T=target, batch=batch, mode=mode, path=dispatch)
                # inference holds one block's stack at a time; training keeps every block's for backward
                est_gb = 2 * stack_gb if mode == "inference" else 3 * stack_gb * depth
                if dispatch == "dense" and est_gb > max_dense_gb:
                    row.update(img_per_s=float("nan"), note=f"skipped: ~{est_gb:.0f} GB of (B,T,N,d) stacks")
                    rows.append(row)
                    continue
                if mode == "inference":
                    moes.eval()
                    hooks = CaREHooks(moes, None)

                    def fn():
                        with torch.no_grad():
                            backbone(x, hooks)
                else:
                    moes.train()
                    hooks = CaREHooks(moes, target - 1)

                    def fn():
                        step_opt.zero_grad(set_to_none=True)
                        feats, latents = backbone.forward_with_sides(x, hooks)
                        (feats.square().mean() + sum(a.square().mean() for a in latents)).backward()
                        step_opt.step()
                # the backbone is timed again right before, so a ratio compares like with like even
                # when the machine's load drifts during the sweep
                if mode == "inference":
                    with torch.no_grad():
                        ref = batch / timed(lambda: backbone(x), repeats, device)
                else:
                    backbone.train().requires_grad_(True)
                    ref = batch / timed(plain_step, repeats, device)
                    backbone.eval().requires_grad_(False)
                row["img_per_s"] = batch / timed(fn, repeats, device)
                row["vs_backbone"] = row["img_per_s"] / ref
                if mode == "train":
                    ptrs = {p.untyped_storage().data_ptr() for p in moes.parameters()}
                    ptrs |= {t.untyped_storage().data_ptr() for m in moes for t in m.cached_tensors()}
                    acts, par = saved_bytes(fn, ptrs)
                    row["saved_activation_mb"], row["saved_param_mb"] = acts / 2**20, par / 2**20
                rows.append(row)
                print(f"[{arch}] T={target:3d} {dispatch:6s} {mode:9s} {row['img_per_s']:8.1f} img/s "
                      f"({row['vs_backbone']:.2f}x backbone)"
                      + (f", saved activations {row['saved_activation_mb']:.1f} MB" if mode == "train" else ""),
                      flush=True)


def plot(df: pd.DataFrame, out: Path) -> None:
    archs = list(dict.fromkeys(df.arch))
    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 4.2), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        sub = df[df.arch == arch]
        for (path, mode), style in {("sparse", "inference"): "C0-o", ("dense", "inference"): "C3-o",
                                    ("sparse", "train"): "C0--s", ("dense", "train"): "C3--s"}.items():
            s = sub[(sub.path == path) & (sub["mode"] == mode)].dropna(subset=["img_per_s"])
            ax.plot(s["T"], s.img_per_s, style, label=f"{path} {mode}")
        for mode, ls in (("inference", "-"), ("train", "--")):
            ref = sub[(sub.path == "backbone") & (sub["mode"] == mode)].img_per_s
            if len(ref):
                ax.axhline(ref.iloc[0], color="gray", ls=ls, lw=1, label=f"backbone {mode}")
        ax.set(xscale="log", yscale="log", xlabel="number of tasks T", ylabel="images / s",
               title=f"CaRE throughput, {arch} (batch {sub.batch.iloc[0]})")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out / "care_speed")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", default=["tiny", "vitb"], choices=list(ARCHS))
    p.add_argument("--tasks", default="1,10,50,100,301")
    p.add_argument("--batch-tiny", type=int, default=256)
    p.add_argument("--batch-vitb", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-dense-gb", type=float, default=8.0, help="skip dense runs whose stacks exceed this")
    p.add_argument("--paths", nargs="+", default=["sparse", "dense"], choices=["sparse", "dense"],
                   help="dispatch paths to measure (dense at large T takes minutes on a CPU)")
    p.add_argument("--modes", nargs="+", default=["inference", "train"], choices=["inference", "train"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default="runs/perf", help="default runs/perf; results/perf holds the reference tables")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    rows: list[dict] = []
    tasks = [int(t) for t in a.tasks.split(",")]
    for arch in a.arch:
        run_arch(arch, tasks, a.batch_tiny if arch == "tiny" else a.batch_vitb, device, a.repeats,
                 a.max_dense_gb, rows, tuple(a.paths), tuple(a.modes))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / "care_speed.csv", index=False, float_format="%.4g")
    plot(df, out)
    print(f"wrote {out / 'care_speed.csv'} and {out / 'care_speed.png'}")


if __name__ == "__main__":
    main()
