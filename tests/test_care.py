"""CaRE mechanics on tiny tensors and a tiny benchmark (spec methods.md §1)."""
import copy

import pytest
import torch

from cilbench.methods.care import CaRE, CaREConfig, decay_factors
from cilbench.methods.common.adapters import Adapter
from cilbench.methods.common.brmoe import BRMoE, BRMoEConfig
from tests.helpers import make_method, tiny_data


def moe_with_tasks(n_tasks, dim=8, classes=3, **kw):
    torch.manual_seed(0)
    moe = BRMoE(dim, BRMoEConfig(expert_dim=4, shared_dim=6, **kw))
    for _ in range(n_tasks):
        moe.add_task(classes)
    return moe.eval()


def test_fresh_adapter_outputs_zero():
    x = torch.randn(2, 5, 8)
    assert torch.equal(Adapter(8, 4)(x), torch.zeros_like(x))
    moe = moe_with_tasks(2)
    for e in moe.experts:  # tasks 0 and 1 start fresh
        assert torch.equal(e(x), torch.zeros_like(x))


def test_expert_init_from_mean_of_earlier_experts_released_off_by_one():
    moe = moe_with_tasks(3)
    with torch.no_grad():
        for i, e in enumerate(moe.experts):
            for p in e.parameters():
                p.fill_(float(i + 1))
    moe.add_task(3)  # task 3: released = mean of experts 0..1 -> 1.5 ; "all" = mean of 0..2 -> 2
    assert torch.allclose(moe.experts[3].scale, torch.full((8,), 1.5))
    moe2 = moe_with_tasks(3, expert_init="all")
    with torch.no_grad():
        for i, e in enumerate(moe2.experts):
            for p in e.parameters():
                p.fill_(float(i + 1))
    moe2.add_task(3)
    assert torch.allclose(moe2.experts[3].scale, torch.full((8,), 2.0))


def test_router_selection_uses_lowest_entropies(monkeypatch):
    moe = moe_with_tasks(5)
    ent = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.2],
                        [0.05, 0.8, 0.7, 0.6, 0.01]])
    monkeypatch.setattr(moe, "entropies", lambda rows, upto: ent[:, :upto])
    rows = torch.zeros(2, 5, 8)
    assert moe.select_routers(rows, None).tolist() == [[1, 4], [4, 0]]        # inference: M=2 lowest of all
    assert moe.select_routers(rows, 3).tolist() == [[3, 1], [3, 0]]           # training: current forced + best of 0..2
    assert moe.select_routers(rows, 0).tolist() == [[0], [0]]


def test_top_k_experts_with_minus_100_fill_and_sum_over_routers():
    moe = moe_with_tasks(5)
    with torch.no_grad():
        for r, router in enumerate(moe.routers):
            router.weight.zero_()
            router.bias.copy_(torch.arange(r + 1, dtype=torch.float32) * (1 if r % 2 else -1))
    rows = torch.randn(1, 5, 8)
    w = moe.expert_weights(rows, torch.tensor([[4, 3]]))
    # router 4: logits [0,-1,-2,-3,-4] -> top-3 = experts 0,1,2 ; router 3: [0,1,2,3] -> top-3 = 1,2,3
    expect4 = torch.softmax(torch.tensor([0.0, -1, -2, -100, -100]), 0)
    expect3 = torch.softmax(torch.tensor([-100.0, 1, 2, 3, float("-inf")]), 0)
    torch.testing.assert_close(w[0], expect4 + expect3)
    assert w.sum().item() == pytest.approx(2.0)                               # a sum over 2 routers


def test_forward_task0_is_expert0_plus_shared():
    moe = moe_with_tasks(1)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_()
    x = torch.randn(2, 5, 8)
    out, latent = moe(x, 0)
    torch.testing.assert_close(out, moe.experts[0](x) + moe.shared(x))
    assert latent.shape == (2, 3)


def test_shared_adapter_is_pulled_to_its_snapshot():
    moe = moe_with_tasks(2).train()
    moe.snapshot_shared()
    snap = [p.detach().clone() for p in moe.shared.parameters()]
    with torch.no_grad():
        for p in moe.shared.parameters():
            p.add_(1.0)
    moe(torch.randn(2, 5, 8), 1)
    for p, a in zip(moe.shared.parameters(), snap):          # θ ← 0.999 θ̂ + 0.001 θ
        torch.testing.assert_close(p, a + 0.001)
    moe.eval()
    assert moe._anchor is None                                # eval mode drops the snapshot


def test_decay_factors_reproduce_the_released_sign():
    tasks = torch.repeat_interleave(torch.arange(301), torch.tensor([100] + [3] * 300))
    f = decay_factors(103, 100, 103, 1, tasks, fixed=False)      # B100 Inc3, task 1
    assert f.min().item() == pytest.approx(-0.75) and f.max().item() == pytest.approx(0.95)
    assert int((f < -1e-9).sum()) == 45 and int((f.abs() < 1e-9).sum()) == 3   # spec: 45/103 negative
    tasks10 = torch.repeat_interleave(torch.arange(100), torch.full((100,), 10))
    f = decay_factors(20, 10, 20, 1, tasks10, fixed=False)       # B0 Inc10, task 1
    assert f[0].item() == pytest.approx(0.95) and f.min().item() == pytest.approx(0.85)
    f = decay_factors(20, 10, 20, 1, tasks10, fixed=True)        # intended: old 0.95, current 1.0
    assert f[0].item() == pytest.approx(0.95) and f[-1].item() == pytest.approx(1.0)


def added_param_formula(d, depth, sizes, r=16, shared=64):
    expert = 4 * d + 2 * d * r + r
    T = len(sizes)
    per_block = (T * expert + (4 * d + 2 * d * shared + shared) + (d + 1) * T * (T + 1) // 2
                 + sum(2 * d + (d + 1) * g for g in sizes))
    return depth * per_block + d * sum(sizes)


def make_care(cfg, bench="tiny-3"):
    return make_method(CaRE, cfg, bench)


def test_parameter_growth_matches_the_formula():
    torch.manual_seed(0)
    method, tasks = make_care(CaREConfig())
    for size in (4, 4, 4, 2):
        method.add_task(size, size)
        assert method.cost().added == added_param_formula(128, 4, method.task_sizes)


def test_vit_b16_after_100_tasks_matches_the_papers_added_parameters():
    """CaRE Table 6: P_a = 90.99 M added parameters at 100 tasks of 10 classes (ViT-B/16)."""
    torch.manual_seed(0)
    moes = [BRMoE(768, BRMoEConfig()) for _ in range(12)]
    for _ in range(100):
        for moe in moes:
            moe.add_task(10)
    brmoe = sum(p.numel() for m in moes for p in m.parameters())
    assert brmoe == added_param_formula(768, 12, [10] * 100) - 768 * 1000
    assert abs(brmoe - 90.99e6) / 90.99e6 < 0.02            # 92.09 M: +1.2 % (cosine heads excluded)


def test_old_triplets_stay_fixed_and_alignment_trains_old_heads():
    method, tasks = make_care(CaREConfig(tuned_epoch=2, batch_size=16, crct_epochs=2))
    method.learn(tasks[0])
    old = copy.deepcopy([(m.experts[0].state_dict(), m.routers[0].state_dict(), m.perceptrons[0].state_dict())
                         for m in method.moes])
    head0 = method.fc.heads[0].detach().clone()
    method.add_task(len(tasks[1].classes), len(tasks[1].labels))
    method._train_stage(tasks[1], 1, 0.02, 0.01)
    method._compute_stats(tasks[1])
    before_ca = method.fc.heads[0].detach().clone()
    moes_before_ca = copy.deepcopy(method.moes.state_dict())
    method._align(tasks[1])
    assert not torch.allclose(method.fc.heads[0], before_ca)          # CA moves the old head
    for k, v in method.moes.state_dict().items():                     # ...and nothing else
        assert torch.equal(v, moes_before_ca[k]), k
    for m, (e, r, p) in zip(method.moes, old):
        for mod, ref in ((m.experts[0], e), (m.routers[0], r), (m.perceptrons[0], p)):
            for k, v in mod.state_dict().items():
                assert torch.equal(v, ref[k]), k
    assert not torch.equal(head0, method.fc.heads[0])
    g = method.gaussians
    assert g.means.shape == (8, 128) and g.scale.shape == (8, 128, 128)


@pytest.mark.parametrize("iter_pred", [True, False])
def test_predict_covers_all_seen_classes(iter_pred):
    method, tasks = make_care(CaREConfig(tuned_epoch=2, batch_size=16, crct_epochs=1, iter_pred=iter_pred))
    for task in tasks[:2]:
        method.learn(task)
    batch = next(iter(tiny_data().test_view(8, 16)))
    scores = method.predict(batch)
    assert scores.shape == (16, 8)
    if iter_pred:   # sum of two softmaxes
        torch.testing.assert_close(scores.sum(1), torch.full((16,), 2.0))


def test_aux_temperature_follows_the_released_block_index_rule():
    from cilbench.methods.care import aux_temperatures

    assert aux_temperatures(12, "released") == [1.0] * 6 + [2.0] * 6      # released: 1 if idx < 6 else 2
    assert aux_temperatures(12, "half") == aux_temperatures(12, "released")
    assert aux_temperatures(4, "released") == [1.0] * 4                   # the embedded ViT: all 1
    assert aux_temperatures(4, "half") == [1.0, 1.0, 2.0, 2.0]


@pytest.mark.parametrize("rule, taus", [("released", [1.0] * 4), ("half", [1.0, 1.0, 2.0, 2.0])])
def test_care_loss_is_the_released_formula(rule, taus):
    """Main CosFace + mean over blocks of (CosFace(latent) + KL(teacher/τ ‖ latent/τ)·τ²)/2, by hand."""
    import torch.nn.functional as F

    from cilbench.methods.care import cosface

    method, tasks = make_care(CaREConfig(batch_size=8, aux_tau=rule, dropout=0.0))
    method.add_task(len(tasks[0].classes), len(tasks[0].labels))
    method.set_train(True)
    batch = next(iter(tasks[0].train_loader(8, augment=False)))
    torch.manual_seed(0)
    loss = method.loss(batch, tasks[0])
    feats, latents = method.features_and_latents(batch.images, 0)
    assert len(latents) == method.backbone.depth
    cur, y = method.fc(feats)[:, :4], batch.labels
    terms = []
    for a, tau in zip(latents, taus):
        kl = F.kl_div(F.log_softmax(a / tau, 1), F.softmax(cur.detach() / tau, 1), reduction="batchmean") * tau ** 2
        terms.append((cosface(a, y, 20.0, 0.0) + kl) / 2)
    torch.testing.assert_close(loss, cosface(cur, y, 20.0, 0.0) + sum(terms) / len(terms))


def test_alignment_stacks_pseudo_features_class_by_class_as_released():
    from cilbench.methods.care import stack_pseudo_features

    draws = torch.arange(3 * 2 * 1, dtype=torch.float).view(3, 2, 1)        # class c, draw i -> 2c + i
    x, y = stack_pseudo_features(draws, "class-major")
    # released: torch.cat([class 0's draws, class 1's, class 2's]) with labels [0]*n + [1]*n + [2]*n
    assert x.flatten().tolist() == [0, 1, 2, 3, 4, 5] and y.tolist() == [0, 0, 1, 1, 2, 2]
    x, y = stack_pseudo_features(draws, "class-minor")
    assert x.flatten().tolist() == [0, 2, 4, 1, 3, 5] and y.tolist() == [0, 1, 2, 0, 1, 2]
