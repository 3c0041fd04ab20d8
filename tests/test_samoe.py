"""Similarity-aware MoE mechanics (spec methods.md §3.2): growing pool, soft top-k routing, masking."""
from dataclasses import replace

import torch
import torch.nn.functional as F

from cilbench.data.base import Batch
from cilbench.methods.common.global_pool import GlobalPromptPool, farthest_queries
from cilbench.methods.samoe import SAMoE, SAMoEConfig
from tests.helpers import make_method, tiny_data

FAST = dict(epochs=1, batch_size=8)


def test_soft_top_k_is_the_cosine_softmax_weighted_sum_and_masked_experts_weigh_nothing():
    torch.manual_seed(0)
    pool = GlobalPromptPool(length=2, dim=4)
    pool.grow(torch.randn(5, 4))
    q = torch.randn(3, 4)
    mix = pool.mix(q, top_k=2, temperature=0.5)
    cos = F.normalize(q, dim=1) @ F.normalize(pool.keys, dim=1).T
    top, idx = cos.topk(2, dim=1)
    w = torch.softmax(top / 0.5, dim=1)
    assert torch.equal(mix.idx, idx)
    assert torch.allclose(mix.prompt, (w[:, :, None, None] * pool.prompts[idx]).sum(1), atol=1e-6)
    allowed = torch.zeros(3, 5, dtype=torch.bool)
    allowed[:, 3:] = True                                     # only experts 3 and 4
    masked = pool.mix(q, top_k=4, temperature=0.5, allowed=allowed)
    used = masked.idx[masked.weight > 0]
    assert ((used == 3) | (used == 4)).all() and torch.allclose(masked.weight.sum(1), torch.ones(3))


def test_new_keys_start_at_the_queries_the_pool_covers_worst():
    keys = torch.tensor([[1.0, 0.0, 0.0]])
    q = torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.9, 0.1]])
    picked = farthest_queries(q, keys, 2)
    assert torch.equal(picked[0], q[1]) and torch.equal(picked[1], q[2])


def _task1_batch(tau):
    torch.manual_seed(0)
    method, tasks = make_method(SAMoE, SAMoEConfig(tau=tau, **FAST))
    method.learn(tasks[0])
    assert method.pool.size == 2 and method.n_old == 2
    method.head.grow(tasks[1].stop)
    batch = next(iter(tasks[1].train_loader(8, augment=False)))
    method._add_experts(batch, tasks[1])
    assert method.pool.size == 4
    return method, tasks, batch


def test_out_of_distribution_samples_send_no_gradient_into_existing_prompts():
    method, tasks, batch = _task1_batch(tau=1.0)            # cos < 1: every sample is out-of-distribution
    loss, in_dist = method.loss(batch, tasks[1])
    assert not in_dist.any()
    loss.backward()
    assert torch.count_nonzero(method.pool.prompts.grad[:2]) == 0
    assert torch.count_nonzero(method.pool.keys.grad[:2]) == 0
    assert method.pool.prompts.grad[2:].abs().sum() > 0 and method.pool.keys.grad[2:].abs().sum() > 0


def test_in_distribution_samples_train_the_matched_existing_prompts():
    method, tasks, batch = _task1_batch(tau=-1.0)           # every sample is in-distribution
    loss, in_dist = method.loss(batch, tasks[1])
    assert in_dist.all()
    loss.backward()
    assert method.pool.prompts.grad[:2].abs().sum() > 0


def test_mixed_batch_masks_per_sample():
    """In a batch of in- and out-of-distribution samples, the old experts' gradient is exactly what the
    in-distribution samples alone give them (losses are batch means, so scaled by the batch sizes)."""
    method, tasks, batch = _task1_batch(tau=0.5)
    with torch.no_grad():
        sims = method.pool.similarity(method.queries(batch))[:, :2].max(1).values
    method.cfg = replace(method.cfg, tau=float(sims.median()))
    loss, in_dist = method.loss(batch, tasks[1])
    assert 0 < in_dist.sum() < len(in_dist)
    loss.backward()
    mixed = method.pool.prompts.grad[:2] * len(in_dist)
    method.pool.prompts.grad = None
    keep = in_dist.nonzero().flatten()
    alone = Batch(batch.images[keep], batch.labels[keep], batch.keys[keep], batch.split, batch.augmented)
    loss_id, _ = method.loss(alone, tasks[1])
    loss_id.backward()
    assert mixed.abs().sum() > 0
    assert torch.allclose(mixed, method.pool.prompts.grad[:2] * len(keep), rtol=1e-4, atol=1e-6)


def test_pool_grows_per_task_and_state_round_trips():
    torch.manual_seed(0)
    method, tasks = make_method(SAMoE, SAMoEConfig(prompts_per_task=3, **FAST))
    for t in tasks:
        method.learn(t)
    assert method.pool.size == 3 * len(tasks) and len(method.id_share) == len(tasks)
    batch = next(iter(tiny_data().test_view(tasks[-1].stop, 16)))
    logits = method.predict(batch)
    assert logits.shape == (16, tasks[-1].stop)
    fresh, _ = make_method(SAMoE, SAMoEConfig(prompts_per_task=3, **FAST))
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.predict(batch), logits)
