"""Build a backbone: the embedded tiny ViT, or any timm ViT with pretrained or local weights.

``weights`` is ``"pretrained"`` (timm's hub weights for ``name``; needs network or a warm cache),
``"none"`` (random init, e.g. for cost measurements), or a path to a local ``.npz`` (big_vision /
AugReg checkpoints, as CaRE uses), ``.pth``/``.pt`` or ``.safetensors`` file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import timm
import torch

from cilbench.backbones.embedded import (EMBEDDED_WEIGHTS, TINY_VIT_MEAN, TINY_VIT_STD,
                                         build_tiny_vit)
from cilbench.backbones.vit import ViTBackbone
from cilbench.errors import ConfigError

EMBEDDED = "embedded-tiny"


@dataclass(frozen=True)
class BackboneConfig:
    name: str = EMBEDDED
    weights: str = "pretrained"  # "pretrained" | "none" | path to a weights file
    drop_path: float = 0.0
    # inputs (x - mean) / std: "dataset" = the benchmark file's convention (CaRE's: CIFAR, ImageNet-A and
    # VTAB only), "off" = [0, 1] inputs as PILOT (and the APER/EASE/MOS tables) feed every dataset, "on"
    normalize: Literal["dataset", "on", "off"] = "dataset"


def load_backbone(cfg: BackboneConfig, normalize: bool = True) -> ViTBackbone:
    if cfg.name == EMBEDDED:
        vit = build_tiny_vit()
        if cfg.weights == "pretrained":
            if not EMBEDDED_WEIGHTS.exists():
                raise ConfigError(f"embedded weights missing at {EMBEDDED_WEIGHTS}",
                                  "run `cilbench pretrain` to rebuild them")
            _load_file(vit, EMBEDDED_WEIGHTS)
        elif cfg.weights != "none":
            _load_file(vit, Path(cfg.weights))
        return ViTBackbone(vit, TINY_VIT_MEAN, TINY_VIT_STD, EMBEDDED, normalize)

    if cfg.name not in timm.list_models(pretrained=False) and cfg.name.split(".")[0] not in timm.list_models():
        from cilbench.errors import suggest
        raise ConfigError(f"unknown timm model {cfg.name!r}", suggest(cfg.name, timm.list_models("vit_*")))
    kwargs = dict(num_classes=0, global_pool="token", drop_path_rate=cfg.drop_path)
    if cfg.weights == "pretrained":
        try:
            vit = timm.create_model(cfg.name, pretrained=True, **kwargs)
        except Exception as e:  # network, hub or cache failures all end here
            raise ConfigError(
                f"could not load pretrained weights for {cfg.name} ({type(e).__name__}: {str(e)[:160]})",
                "no network? download the checkpoint elsewhere and pass --set backbone.weights=/path/to/file"
                " (.npz, .pth or .safetensors)") from e
    else:
        vit = timm.create_model(cfg.name, pretrained=False, **kwargs)
        if cfg.weights != "none":
            _load_file(vit, Path(cfg.weights))
    pcfg = vit.pretrained_cfg or {}
    return ViTBackbone(vit, pcfg.get("mean", (0.5,) * 3), pcfg.get("std", (0.5,) * 3), cfg.name, normalize)


def _load_file(vit: torch.nn.Module, path: Path) -> None:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist", "pass an existing .npz/.pth/.safetensors file")
    if path.suffix == ".npz":
        vit.load_pretrained(str(path))  # timm's big_vision/AugReg converter
        return
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    elif path.suffix in (".pth", ".pt", ".bin"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    else:
        raise ConfigError(f"unsupported weights file {path.name}", "use .npz, .pth/.pt or .safetensors")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("head.")}
    try:
        missing, unexpected = vit.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:200])
        raise ConfigError(f"weights file {path} does not fit the model ({first})",
                          "check that backbone.name matches the checkpoint") from e
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise ConfigError(f"weights file {path} does not fit the model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}", "check that backbone.name matches the checkpoint")
