"""CODA-Prompt mechanics: component weights, task slices, orthogonal init, frozen backbone."""
import torch
import torch.nn.functional as F

from cilbench.methods.coda_prompt import CODAPrompt, CODAPromptConfig, orthonormal_rows
from tests.helpers import make_method, tiny_data

SYNTH = dict(layers=(0, 1, 2, 3), pool_size=9, batch_size=8, epochs=1)


def test_weights_are_cosines_of_query_times_attention_with_keys():
    torch.manual_seed(0)
    q, K, A = torch.randn(3, 6), torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    alpha = CODAPrompt.weights(q, K, A)
    ref = F.cosine_similarity(q[None, :, None, :] * A[:, None], K[:, None], dim=-1)
    assert alpha.shape == (2, 3, 4) and torch.allclose(alpha, ref, atol=1e-6)


def test_new_components_are_orthonormal_to_earlier_ones():
    torch.manual_seed(0)
    old = torch.randn(5, 32)
    new = orthonormal_rows(old, 4)
    assert torch.allclose(new @ new.T, torch.eye(4), atol=1e-5)
    assert (new @ old.T).abs().max() < 1e-4
    assert torch.allclose(orthonormal_rows(old, 40).norm(dim=1), torch.ones(40))  # no room: unit rows


def test_only_the_current_tasks_components_learn():
    torch.manual_seed(0)
    method, tasks = make_method(CODAPrompt, CODAPromptConfig(**SYNTH))
    assert method.per_task == 3 and method.P.shape[1] == 9            # 9 components over 3 tasks
    method.learn(tasks[0])
    snap = {n: getattr(method, n).detach().clone() for n in "PKA"}
    method.head.grow(tasks[1].stop)
    method._init_components(3, 6)
    batch = next(iter(tasks[1].train_loader(8)))
    for p in (method.P, method.K, method.A, method.head.weight, method.head.bias):
        p.grad = None                                                 # left over from task 0
    method.loss(batch, tasks[1]).backward()
    for n in "PKA":
        g = getattr(method, n).grad.flatten(2).abs().sum((0, 2))       # per component
        assert (g[:3] == 0).all() and (g[3:6] > 0).all() and (g[6:] == 0).all(), n
        assert torch.equal(getattr(method, n)[:, :3], snap[n][:, :3])
    h = method.head.weight.grad.abs().sum(1)
    assert (h[: tasks[1].start] == 0).all() and (h[tasks[1].start:] > 0).all()
    assert all(p.grad is None for p in method.backbone.parameters())


def test_learn_predict_state_round_trip_and_pool_growth_for_long_sequences():
    torch.manual_seed(0)
    method, tasks = make_method(CODAPrompt, CODAPromptConfig(**SYNTH))
    method.learn(tasks[0])
    batch = next(iter(tiny_data().test_view(tasks[0].stop, 16)))
    out = method.predict(batch)
    assert out.shape == (len(batch.labels), tasks[0].stop) and method.n_learned == 3
    fresh, _ = make_method(CODAPrompt, CODAPromptConfig(**SYNTH))
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.predict(batch), out)
    many, _ = make_method(CODAPrompt, CODAPromptConfig(**{**SYNTH, "pool_size": 2}))
    assert many.per_task == 1 and many.P.shape[1] == 3                # T > M: one component per task
