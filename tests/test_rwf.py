import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cilbench.errors import CilbenchError
from cilbench.evaluator import Evaluator
from cilbench.method import OnlineProtocol, RunContext
from cilbench.methods.common.hopfield import HopfieldPrompts, free_energy, retrieve
from cilbench.methods.rwf import RwF, RwFConfig
from tests.helpers import make_method, tiny_data


def test_retrieval_is_softmax_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 8, generator=g) for n in (3, 7, 7))
    expected = F.scaled_dot_product_attention(q, k, v, scale=0.7)
    torch.testing.assert_close(retrieve(q, k, v, beta=0.7), expected)


def test_retrieval_weights_minimise_the_free_energy():
    """A numerical minimiser over the simplex (softmax-parametrised L-BFGS) lands on softmax(β K ξ)."""
    g = torch.Generator().manual_seed(1)
    keys, xi, beta = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(5, generator=g,
                                                                                      dtype=torch.float64), 1.3
    closed_form = torch.softmax(beta * keys @ xi, dim=0)
    z = torch.zeros(9, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([z], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = free_energy(torch.softmax(z, 0), xi, keys, beta)
        f.backward()
        return f
    opt.step(closure)
    numeric = torch.softmax(z.detach(), 0)
    torch.testing.assert_close(numeric, closed_form, atol=1e-6, rtol=0)
    f_star = free_energy(closed_form, xi, keys, beta)
    others = torch.distributions.Dirichlet(torch.ones(9, dtype=torch.float64)).sample((200,))
    assert all(free_energy(p, xi, keys, beta) > f_star for p in others)
    # and the retrieved pattern is the p*-weighted mean of the values
    values = torch.randn(9, 4, dtype=torch.float64, generator=g)
    torch.testing.assert_close(retrieve(xi[None], keys, values, beta)[0], closed_form @ values)


def test_untrained_projections_are_identity_and_only_listed_ones_train():
    layer = HopfieldPrompts(16, 4, trainable=("q", "o"))
    assert [n for n, p in layer.proj.named_parameters() if p.requires_grad] == ["q.weight", "o.weight"]
    x = torch.randn(2, 6, 16)
    stored = layer.norm_stored(x)
    q = layer.norm_state(layer.queries)
    torch.testing.assert_close(layer(x), retrieve(q, stored, stored, 1 / 4))


def rwf(**cfg):
    return make_method(RwF, RwFConfig(**{"blocks": 2, "prompt_length": 3, "batch_size": 8, **cfg}))


def test_prompts_are_inserted_after_cls_and_removed_and_only_rwf_parts_train():
    method, tasks = rwf()
    images = torch.rand(2, 3, 32, 32)
    n_tokens = method.backbone.embed(images).shape[1]
    lengths = []
    handles = [blk.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
               for blk in method.backbone.vit.blocks]
    method.backbone(images, method.hooks)
    for h in handles:
        h.remove()
    assert lengths == [n_tokens + 3, n_tokens + 3, n_tokens, n_tokens]  # blocks 0-1 host prompts
    frozen = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    before = {k: v.clone() for k, v in method.hooks.state_dict().items()}
    method.learn(tasks[0])
    assert all(torch.equal(v, method.backbone.state_dict()[k]) for k, v in frozen.items())
    assert not torch.equal(before["layers.0.queries"], method.hooks.state_dict()["layers.0.queries"])
    assert torch.equal(before["layers.0.proj.k.weight"], method.hooks.state_dict()["layers.0.proj.k.weight"])
    assert method.logits(images).shape == (2, tasks[0].stop)  # seen classes only


def test_online_stream_visits_each_training_sample_exactly_once(monkeypatch):
    from cilbench.data.base import SinglePass

    method, tasks = rwf()
    data, seen, original = tiny_data(), [], SinglePass.__iter__

    def recording(self):
        for batch in original(self):
            assert len(batch.labels) <= 5
            seen.extend(batch.keys.tolist())
            yield batch
    monkeypatch.setattr(SinglePass, "__iter__", recording)
    ev = Evaluator(method, data, RunContext(seed=0), online=OnlineProtocol(True, batch_size=5, iters=2))
    for t in range(len(ev.splits)):
        ev.run_task(t)
    train_keys = np.concatenate([data.training.train_view(s.start, s.stop, 1, False, False, 0).indices for s in ev.splits])
    assert sorted(seen) == sorted(train_keys.tolist())  # every training sample, each exactly once


def test_online_stream_cannot_be_read_twice():
    _, tasks = rwf()
    task = tasks[0]
    task.online = OnlineProtocol(True)
    stream = task.train_loader(4)
    list(stream)
    with pytest.raises(CilbenchError, match="stream twice"):
        list(stream)
    with pytest.raises(CilbenchError, match="stream twice"):
        task.train_loader(4)


def test_state_round_trip_includes_the_optimizer():
    a, tasks = rwf()
    a.learn(tasks[0])
    b, _ = rwf()
    b.load_state_dict(a.state_dict())
    images = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(a.logits(images), b.logits(images))
    assert b.opt.state_dict()["state"].keys() == a.opt.state_dict()["state"].keys() != set()


def test_batch_mask_lets_only_the_batch_classes_compete():
    method, _ = rwf(loss_mask="batch")
    logits = torch.randn(4, 6, requires_grad=True)
    labels = torch.tensor([1, 1, 4, 1])
    method.loss(logits, labels).backward()
    assert torch.all(logits.grad[:, [0, 2, 3, 5]] == 0) and torch.all(logits.grad[:, [1, 4]] != 0)
    expected = F.cross_entropy(logits.detach()[:, [1, 4]], torch.tensor([0, 0, 1, 0]))
    torch.testing.assert_close(method.loss(logits.detach(), labels), expected)
