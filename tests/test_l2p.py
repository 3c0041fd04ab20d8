"""L2P mechanics (spec methods.md §4): selection, batch-wise vote, class mask, pull constraint, freezing."""
import pytest
import torch
import torch.nn.functional as F

from cilbench.config import build

from cilbench.errors import ConfigError
from cilbench.methods.common.prompts import PromptPool, majority, prompted_tokens
from cilbench.methods.l2p import L2P, L2PConfig
from tests.helpers import make_method, tiny_data


def test_selected_prompts_are_the_top_n_keys_by_cosine():
    torch.manual_seed(0)
    pool = PromptPool(size=6, length=2, dim=4, top_k=2)
    with torch.no_grad():
        pool.keys.copy_(torch.eye(6, 4) * torch.arange(1, 7)[:, None])  # keys 4, 5 are zero vectors
        pool.keys[4] = torch.tensor([1.0, 1.0, 0.0, 0.0])
        pool.keys[5] = torch.tensor([0.0, 0.0, -1.0, 0.0])
    q = torch.tensor([[1.0, 0.9, 0.0, 0.0], [0.0, 0.0, 1.0, 0.2]])
    sel = pool.select(q, vote=False)
    cos = F.normalize(q, dim=1) @ F.normalize(pool.keys, dim=1).T
    assert sel.idx.tolist() == [[4, 0], [2, 3]]
    assert torch.allclose(sel.sim, cos.gather(1, sel.idx))
    assert torch.equal(sel.prompts[1], torch.cat([pool.prompts[2], pool.prompts[3]]))


def test_batchwise_vote_takes_the_most_frequent_ids_lower_id_on_ties():
    idx = torch.tensor([[3, 1], [3, 2], [1, 0], [2, 3]])  # counts: 3->3, 1->2, 2->2, 0->1
    assert majority(idx, 5, 2).tolist() == [[3, 1]]
    pool = PromptPool(size=5, length=1, dim=3, top_k=2)
    sel = pool.select(torch.randn(7, 3), vote=True)
    assert (sel.idx == sel.idx[0]).all() and sel.idx.shape == (7, 2)


def test_class_mask_stops_gradients_to_other_classes_and_pull_term_is_exact():
    torch.manual_seed(0)
    method, tasks = make_method(L2P, L2PConfig(batch_size=8))
    method.head.grow(tasks[1].stop)
    batch = next(iter(tasks[1].train_loader(8, augment=False)))
    loss = method.loss(batch, tasks[1])
    loss.backward()
    g = method.head.weight.grad.abs().sum(1)
    t = tasks[1]
    assert (g[: t.start] == 0).all() and (g[t.stop:] == 0).all() and (g[t.start:t.stop] > 0).all()
    with torch.no_grad():
        logits, _ = method.forward(batch, t)
        ce = F.cross_entropy(logits[:, t.start:t.stop], batch.labels - t.start)
        sel = method.pool.select(method.queries(batch), vote=True, ties=method.cfg.vote_ties)
    assert torch.allclose(loss, ce - 0.1 * sel.sim.sum() / len(batch.labels), atol=1e-6)
    assert method.pool.keys.grad is not None and method.pool.keys.grad.abs().sum() > 0


def test_only_prompts_keys_and_head_train():
    torch.manual_seed(0)
    method, tasks = make_method(L2P, L2PConfig(batch_size=16, epochs=1))
    before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    pool0 = {k: v.clone() for k, v in method.pool.state_dict().items()}
    method.learn(tasks[0])
    assert all(torch.equal(before[k], v) for k, v in method.backbone.state_dict().items())
    assert all(not torch.equal(pool0[k], v) for k, v in method.pool.state_dict().items())
    batch = next(iter(tiny_data().test_view(tasks[0].stop, 16)))
    assert method.predict(batch).shape == (len(batch.labels), tasks[0].stop)
    fresh, _ = make_method(L2P, L2PConfig(batch_size=16, epochs=1))
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.predict(batch), method.predict(batch))


def test_prompts_sit_after_cls_with_the_cls_position_embedding():
    torch.manual_seed(0)
    method, _ = make_method(L2P, L2PConfig())
    vit = method.backbone
    x = torch.rand(2, 3, 32, 32)
    prompts = torch.randn(2, 7, vit.embed_dim)
    out = prompted_tokens(vit, x, prompts)
    # reference: build the sequence by hand
    tokens = vit.embed(x)
    seq = torch.cat([tokens[:, :1], prompts + vit.vit.pos_embed[:, :1], tokens[:, 1:]], 1)
    ref = vit.vit.norm(vit.run_blocks(seq))[:, 1:8]
    assert out.shape == (2, 7, vit.embed_dim) and torch.allclose(out, ref)


def test_presets_and_overrides():
    assert (L2PConfig().pool_size, L2PConfig().top_k, L2PConfig().pull_coeff, L2PConfig().batch_size) == (10, 5, 0.1, 16)
    off = L2PConfig(preset="official")
    assert (off.prompt_length, off.top_k, off.pull_coeff, off.lr) == (10, 4, 1.0, 0.015)
    assert L2PConfig(preset="paper", lr=0.01).lr == 0.01
    with pytest.raises(ConfigError, match=r"method.top_k = 11 is out of range\n  -> use a value in \[1, 10\]"):
        build(L2PConfig, [("test", {"top_k": 11})])     # the bound is the preset's pool size


def test_the_pilot_preset_is_pilots_recipe_and_the_default():
    c = L2PConfig()
    assert c.preset == "pilot" and c.clip_grad == 0.0 and c.head_init == "trunc_normal" and c.vote_ties == "pilot"
    assert (c.pool_size, c.prompt_length, c.top_k, c.pull_coeff, c.lr, c.batch_size) == (10, 5, 5, 0.1, 0.001875, 16)
    port = L2PConfig(preset="pytorch-port")
    assert port.clip_grad == 1.0 and port.head_init == "linear" and port.vote_ties == "lowest"


def test_pilot_head_rows_are_timms_vit_head_init():
    """trunc-normal(std 0.02), zero bias (timm init_weights_vit_timm); nn.Linear's default on 128 inputs
    would be uniform(±1/√128), std ≈ 0.051."""
    torch.manual_seed(0)
    method, tasks = make_method(L2P, L2PConfig())
    method.head.grow(40)
    w = method.head.weight.detach()
    assert torch.equal(method.head.bias.detach(), torch.zeros(40))
    assert 0.018 < w.std().item() < 0.022 and abs(w.mean().item()) < 0.002
    linear, _ = make_method(L2P, L2PConfig(preset="pytorch-port"))
    linear.head.grow(40)
    assert linear.head.weight.detach().std().item() > 0.045


@pytest.mark.parametrize("preset, clipped", [("pilot", False), ("pytorch-port", True)])
def test_pilot_does_not_clip_gradients(monkeypatch, preset, clipped):
    calls = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    method, tasks = make_method(L2P, L2PConfig(preset=preset, epochs=1))
    method.learn(tasks[0])
    assert (len(calls) > 0) == clipped and all(c == 1.0 for c in calls)


def test_pilot_vote_tie_break_is_unique_then_topk_over_counts():
    idx = torch.tensor([[3, 1], [3, 2], [1, 0], [2, 3]])          # counts: 3->3, 1->2, 2->2, 0->1
    top = majority(idx, 5, 2, ties="pilot")
    assert top[0, 0] == 3 and top[0, 1] in (1, 2)                  # 1 and 2 tie: torch.topk picks one
    assert majority(torch.tensor([[4, 4]]), 5, 1, ties="pilot").tolist() == [[4]]
