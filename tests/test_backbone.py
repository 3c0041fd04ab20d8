import pytest
import torch

from cilbench.backbones.embedded import EMBEDDED_WEIGHTS
from cilbench.backbones.loader import BackboneConfig, load_backbone
from cilbench.backbones.vit import BlockHooks
from cilbench.errors import ConfigError


def test_timm_vit_builds_without_weights():
    bb = load_backbone(BackboneConfig("vit_tiny_patch16_224", weights="none")).eval()
    assert bb.embed_dim == 192 and bb.depth == 12 and bb.img_size == 224
    with torch.no_grad():
        f = bb(torch.rand(2, 3, 224, 224))
    assert f.shape == (2, 192)


def test_embedded_weights_ship_and_load():
    assert EMBEDDED_WEIGHTS.exists()
    bb = load_backbone(BackboneConfig()).eval()
    rand = load_backbone(BackboneConfig(weights="none"))
    assert not torch.equal(bb.vit.patch_embed.proj.weight, rand.vit.patch_embed.proj.weight)
    with torch.no_grad():
        assert bb(torch.rand(3, 3, 32, 32)).shape == (3, 128)


class ZeroBranch(BlockHooks):
    def __init__(self):
        self.calls = []

    def parallel(self, i, z_a):
        self.calls.append(i)
        return torch.zeros_like(z_a)


class Prompt(BlockHooks):
    """Insert 2 tokens after CLS before block 0, remove them after block 0."""

    def before_block(self, i, x):
        if i == 0:
            p = torch.zeros(x.shape[0], 2, x.shape[2])
            return torch.cat([x[:, :1], p, x[:, 1:]], 1)
        return x

    def after_block(self, i, x):
        return torch.cat([x[:, :1], x[:, 3:]], 1) if i == 0 else x


def test_hooks_decompose_blocks_exactly():
    bb = load_backbone(BackboneConfig()).eval()
    x = torch.rand(4, 3, 32, 32)
    hooks = ZeroBranch()
    with torch.no_grad():
        plain, hooked = bb(x), bb(x, hooks)
        prompted = bb(x, Prompt())
    assert hooks.calls == list(range(bb.depth))
    torch.testing.assert_close(plain, hooked, rtol=1e-5, atol=1e-5)
    assert prompted.shape == plain.shape and not torch.allclose(prompted, plain)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file_round_trip(tmp_path, suffix):
    src = load_backbone(BackboneConfig("vit_tiny_patch16_224", weights="none"))
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in src.vit.state_dict().items()}
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file
        save_file(state, str(path))
    dst = load_backbone(BackboneConfig("vit_tiny_patch16_224", weights=str(path)))
    assert torch.equal(dst.vit.blocks[3].mlp.fc1.weight, src.vit.blocks[3].mlp.fc1.weight)


def test_weights_file_for_another_model_is_an_error(tmp_path):
    src = load_backbone(BackboneConfig(weights="none"))
    path = tmp_path / "tiny.pth"
    torch.save(src.vit.state_dict(), path)
    with pytest.raises(ConfigError, match="does not fit"):
        load_backbone(BackboneConfig("vit_tiny_patch16_224", weights=str(path)))


def test_missing_weights_file_and_unknown_model_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_backbone(BackboneConfig("vit_tiny_patch16_224", weights=str(tmp_path / "nope.pth")))
    with pytest.raises(ConfigError, match="unknown timm model"):
        load_backbone(BackboneConfig("vit_tiny_patch16_244", weights="none"))
