"""Sparse (CLS-first) dispatch computes the dense reference function (spec methods.md §5.2)."""
import copy

import pytest
import torch

from cilbench.methods.common.brmoe import BRMoE, BRMoEConfig


def paired(n_tasks, seed=0, dim=16, sizes=None):
    torch.manual_seed(seed)
    dense = BRMoE(dim, BRMoEConfig(expert_dim=4, shared_dim=6, dropout=0.0, dispatch="dense"))
    for t in range(n_tasks):
        dense.add_task(sizes[t] if sizes else (5 if t == 0 else 3))
    with torch.no_grad():  # trained-looking weights: no zero scales, well separated entropies
        for p in dense.parameters():
            p.normal_(0, 0.5)
    sparse = copy.deepcopy(dense)
    object.__setattr__(sparse, "cfg", BRMoEConfig(expert_dim=4, shared_dim=6, dropout=0.0, dispatch="sparse"))
    return dense, sparse


@pytest.mark.parametrize("n_tasks", [1, 2, 10, 60])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_sparse_equals_dense(n_tasks, mode):
    dense, sparse = paired(n_tasks)
    for m in (dense, sparse):
        m.train(mode == "train")
    x = torch.randn(6, 9, 16)
    tasks = [None] if mode == "eval" else []
    tasks += [n_tasks - 1] + ([n_tasks // 2] if n_tasks > 2 else [])
    for task in tasks:
        with torch.no_grad():
            out_d, lat_d = dense(x, task)
            out_s, lat_s = sparse(x, task)
        torch.testing.assert_close(out_s, out_d, rtol=1e-5, atol=1e-5)
        if task is not None:
            torch.testing.assert_close(lat_s, lat_d, rtol=1e-5, atol=1e-5)
        # routing decisions agree: the same routers, and the same experts carry the mixture weight
        cls_d = torch.stack([e(x[:, :1])[:, 0] for e in dense.experts[: (task + 1 if task is not None else n_tasks)]], 1)
        assert torch.equal(dense.select_routers(cls_d, task), sparse.last_selected)
        weights = dense.expert_weights(cls_d, sparse.last_selected)
        used = weights.topk(sparse.last_experts.shape[1], dim=1).indices
        assert torch.equal(used.sort(1).values, sparse.last_experts.sort(1).values)


def test_sparse_gradients_match_dense_in_training():
    dense, sparse = paired(10)
    x = torch.randn(4, 7, 16)
    grads = []
    for m in (dense, sparse):
        m.train()
        out, latent = m(x, 9)
        (out.square().mean() + latent.square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("n_tasks", [1, 2, 10, 60])
def test_sparse_passes_the_released_gradient_to_the_block_input(n_tasks):
    """The frozen experts and routers have no trainable weights, but the block input's gradient flows
    through them (into earlier blocks); the sparse path must keep that part of the gradient."""
    dense, sparse = paired(n_tasks)
    x = torch.randn(4, 7, 16)
    grads = []
    for m in (dense, sparse):
        m.train()
        xi = x.clone().requires_grad_(True)
        out, latent = m(xi, n_tasks - 1)
        (out.square().mean() + latent.square().mean()).backward()
        grads.append(xi.grad)
    assert grads[0].abs().max() > 0.01
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5 * grads[0].abs().max().item())


@pytest.mark.parametrize("n_tasks", [1, 2, 10, 60])
def test_a_three_block_model_trains_to_the_same_parameters_sparse_or_dense(n_tasks):
    """5 SGD steps through three stacked blocks (the earlier blocks' trainable parts get the gradient
    that passed through the later blocks' frozen experts)."""
    pairs = [paired(n_tasks, seed=s) for s in range(3)]
    models = [torch.nn.ModuleList(p[i] for p in pairs) for i in (0, 1)]
    start = {n: p.detach().clone() for n, p in models[0].named_parameters()}
    torch.manual_seed(7)
    batches = [torch.randn(6, 9, 16) for _ in range(5)]
    for model in models:
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        for x in batches:
            loss = 0
            for block in model:
                out, latent = block(x, n_tasks - 1)
                x = x + out
                loss = loss + latent.square().mean()
            loss = loss + x.square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    dense, sparse = ({n: p for n, p in m.named_parameters() if p.requires_grad} for m in models)
    assert max((dense[n] - start[n]).abs().max().item() for n in dense) > 0.1   # the steps moved them
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-5, atol=1e-5, msg=name)


def test_ragged_and_unequal_perceptrons():
    dense, sparse = paired(6, sizes=[7, 3, 3, 3, 3, 2])
    dense.eval(), sparse.eval()
    x = torch.randn(5, 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x, None)[0], dense(x, None)[0], rtol=1e-5, atol=1e-5)


def test_cache_follows_new_tasks_and_loaded_weights():
    dense, sparse = paired(3)
    sparse.eval()
    x = torch.randn(2, 4, 16)
    with torch.no_grad():
        sparse(x, None)                                  # fills the cache
        sparse.load_state_dict(dense.state_dict())       # same values, but must invalidate
        for p in dense.experts[0].parameters():
            p.add_(0.3)
        sparse.load_state_dict(dense.state_dict())
        dense.eval()
        torch.testing.assert_close(sparse(x, None)[0], dense(x, None)[0], rtol=1e-5, atol=1e-5)


def saved_activation_bytes(moe, x, task):
    ptrs = {p.untyped_storage().data_ptr() for p in moe.parameters()}
    moe(x, task)  # fill the frozen-stack cache, then count what autograd keeps besides parameters
    ptrs |= {t.untyped_storage().data_ptr() for t in moe.cached_tensors()}
    total = [0]

    def pack(t):
        if t.untyped_storage().data_ptr() not in ptrs:
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        moe(x, task)
    return total[0]


def test_sparse_training_saves_only_the_router_rows_per_task_when_the_input_needs_grad():
    """Inside a network the block input carries gradient through the frozen experts; still, per extra
    task autograd keeps only the M selected routers' softmax rows (M floats and M mask bytes per
    sample), neither the experts' hidden states nor a (B, T, d) stack."""
    dim = 64
    x = torch.randn(32, 9, dim).requires_grad_(True)
    sizes = {}
    for n_tasks in (10, 80):
        dense, sparse = paired(n_tasks, dim=dim)
        dense.train(), sparse.train()
        sizes[n_tasks] = (saved_activation_bytes(sparse, x, n_tasks - 1), saved_activation_bytes(dense, x, n_tasks - 1))
    per_task_per_sample = (sizes[80][0] - sizes[10][0]) / (70 * 32)           # bytes
    m = sparse.cfg.topk_routers
    assert per_task_per_sample <= m * 4 + m              # softmax rows (float32) + their top-K masks (bool)
    assert sizes[80][1] - sizes[10][1] > 20 * (sizes[80][0] - sizes[10][0])    # the released path's stack


def test_sparse_training_activations_do_not_grow_with_tasks():
    x = torch.randn(32, 9, 16)
    sizes = {}
    for n_tasks in (10, 80):
        dense, sparse = paired(n_tasks)
        dense.train(), sparse.train()
        sizes[n_tasks] = (saved_activation_bytes(sparse, x, n_tasks - 1), saved_activation_bytes(dense, x, n_tasks - 1))
    sparse_growth = sizes[80][0] / sizes[10][0]
    dense_growth = sizes[80][1] / sizes[10][1]
    assert sparse_growth < 1.1          # only the B·M·T router softmax rows grow
    assert dense_growth > 4             # the released path keeps the (B, T, N, d) stack
