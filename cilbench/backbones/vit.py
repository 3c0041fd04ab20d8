"""A ViT wrapper whose blocks can host adapters, experts and prompts.

The forward is timm's (patch embed -> position embedding -> blocks -> norm) with three optional
per-block hooks, so methods never patch timm modules:
- ``before_block(i, x)``: e.g. insert prompt tokens;
- ``parallel(i, z_a)``: a branch added beside the MLP (AdaptFormer "parallel" placement:
  ``z' = z_a + MLP(LN(z_a)) + branch(z_a)`` with ``z_a = z + MHSA(LN(z))``); it may return
  ``(branch, side)``, and ``forward_with_sides`` returns the sides;
- ``after_block(i, x)``: e.g. remove the prompt tokens again;
- ``attn_prefix(i, x)``: (key, value) prefixes (B, P, d) prepended to the block's attention keys and
  values, prefix-tuning as in DualPrompt / CODA-Prompt (queries and output length unchanged).
Blocks without a parallel branch or prefixes run timm's fused ``Block.forward``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from timm.models.vision_transformer import VisionTransformer


class BlockHooks:
    """Override the hooks you need; the defaults leave the ViT unchanged."""

    def before_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def parallel(self, i: int, z_a: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, object] | None:
        return None

    def after_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def attn_prefix(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def has_parallel(self, i: int) -> bool:
        return type(self).parallel is not BlockHooks.parallel


def prefix_attention(attn: nn.Module, x: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor) -> torch.Tensor:
    """timm ``Attention`` with (B, P, d) key/value prefixes: softmax(q [pk; k]ᵀ/√d_h) [pv; v]."""
    b, n, _ = x.shape
    h, hd = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    k = torch.cat([pk.reshape(b, -1, h, hd).transpose(1, 2).to(k.dtype), k], dim=2)
    v = torch.cat([pv.reshape(b, -1, h, hd).transpose(1, 2).to(v.dtype), v], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    return attn.proj_drop(attn.proj(attn.norm(out.transpose(1, 2).reshape(b, n, -1))))


class ViTBackbone(nn.Module):
    def __init__(self, vit: VisionTransformer, mean: Sequence[float], std: Sequence[float], name: str,
                 normalize: bool = True):
        super().__init__()
        self.vit, self.name, self.normalize = vit, name, normalize
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def img_size(self) -> int:
        return self.vit.patch_embed.img_size[0]

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[0,1] images -> token sequence entering block 0 (CLS first)."""
        if self.normalize:
            images = (images - self.mean) / self.std
        v = self.vit
        x = v.patch_embed(images)
        x = v._pos_embed(x)
        x = v.patch_drop(x)
        return v.norm_pre(x)

    def run_blocks(self, x: torch.Tensor, hooks: BlockHooks | None = None, start: int = 0,
                   stop: int | None = None) -> torch.Tensor:
        return self.run_blocks_with_sides(x, hooks, start, stop)[0]

    def run_blocks_with_sides(self, x: torch.Tensor, hooks: BlockHooks | None = None, start: int = 0,
                              stop: int | None = None) -> tuple[torch.Tensor, list]:
        """The blocks, and the side outputs of ``parallel`` hooks that return ``(branch, side)`` (e.g.
        CaRE's per-block perceptron logits), in block order: returned, not left on the hooks."""
        blocks, sides = self.vit.blocks, []
        for i in range(start, len(blocks) if stop is None else stop):
            blk = blocks[i]
            if hooks is None:
                x = blk(x)
                continue
            x = hooks.before_block(i, x)
            prefix = hooks.attn_prefix(i, x)
            if prefix is not None or hooks.has_parallel(i):
                y = blk.norm1(x)
                y = blk.attn(y) if prefix is None else prefix_attention(blk.attn, y, *prefix)
                z_a = x + blk.drop_path1(blk.ls1(y))
                x = z_a + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(z_a))))
                branch = hooks.parallel(i, z_a)
                if isinstance(branch, tuple):
                    branch, side = branch
                    if side is not None:
                        sides.append(side)
                if branch is not None:
                    x = x + branch
            else:
                x = blk(x)
            x = hooks.after_block(i, x)
        return x, sides

    def forward_with_sides(self, images: torch.Tensor, hooks: BlockHooks) -> tuple[torch.Tensor, list]:
        """(CLS feature after the final LayerNorm, the hooks' side outputs)."""
        x, sides = self.run_blocks_with_sides(self.embed(images), hooks)
        return self.vit.norm(x)[:, 0], sides

    def forward_tokens(self, images: torch.Tensor, hooks: BlockHooks | None = None) -> torch.Tensor:
        """Final-normed tokens (B, N, d)."""
        return self.vit.norm(self.run_blocks(self.embed(images), hooks))

    def forward(self, images: torch.Tensor, hooks: BlockHooks | None = None) -> torch.Tensor:
        """CLS feature after the final LayerNorm (B, d) -- PILOT's ``global_pool=False`` feature."""
        return self.forward_tokens(images, hooks)[:, 0]
