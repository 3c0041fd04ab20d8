"""DualPrompt mechanics: prefix-tuning attention, task prompts at train time, query selection at test."""
import pytest
import torch
import torch.nn.functional as F

from cilbench.backbones.vit import prefix_attention
from cilbench.errors import ConfigError
from cilbench.methods.dualprompt import DualPrompt, DualPromptConfig
from tests.helpers import make_method, tiny_data

SYNTH = dict(e_layers=(2, 3), batch_size=8)


def test_prefix_attention_prepends_keys_and_values():
    torch.manual_seed(0)
    method, _ = make_method(DualPrompt, DualPromptConfig(**SYNTH))
    attn = method.backbone.vit.blocks[0].attn.eval()
    x = torch.randn(2, 5, attn.head_dim * attn.num_heads)
    empty = x.new_zeros(2, 0, x.shape[-1])
    assert torch.allclose(prefix_attention(attn, x, empty, empty), attn(x), atol=1e-6)
    pk, pv = torch.randn(2, 3, x.shape[-1]), torch.randn(2, 3, x.shape[-1])
    b, n, d = x.shape
    h, hd = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4)
    k = torch.cat([pk.reshape(b, 3, h, hd).transpose(1, 2), k], 2)
    v = torch.cat([pv.reshape(b, 3, h, hd).transpose(1, 2), v], 2)
    ref = ((q @ k.transpose(-1, -2)) / hd ** 0.5).softmax(-1) @ v
    ref = attn.proj(ref.transpose(1, 2).reshape(b, n, d))
    assert torch.allclose(prefix_attention(attn, x, pk, pv), ref, atol=1e-5)


def test_training_uses_the_task_prompt_and_only_prompts_keys_head_learn():
    torch.manual_seed(0)
    method, tasks = make_method(DualPrompt, DualPromptConfig(**SYNTH))
    method.head.grow(tasks[1].stop)
    batch = next(iter(tasks[1].train_loader(8)))
    method.loss(batch, tasks[1]).backward()
    e_grad = method.e_prompt.grad.abs().sum(dim=(0, 1, 3, 4))          # per pool entry
    assert e_grad[1] > 0 and (e_grad[torch.arange(10) != 1] == 0).all()
    k_grad = method.keys.grad.abs().sum(1)
    assert k_grad[1] > 0 and (k_grad[torch.arange(10) != 1] == 0).all()
    assert method.g_prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.backbone.parameters())
    h = method.head.weight.grad.abs().sum(1)
    assert (h[: tasks[1].start] == 0).all() and (h[tasks[1].start:] > 0).all()


def test_test_time_selection_is_top1_by_cosine_per_sample_and_votes_only_on_request():
    torch.manual_seed(0)
    method, tasks = make_method(DualPrompt, DualPromptConfig(**SYNTH))   # batchwise_prompt on (training)
    q = torch.randn(6, method.backbone.embed_dim)
    idx, sim = method.select(q, None)
    cos = F.normalize(q, dim=1) @ F.normalize(method.keys, dim=1).T
    assert torch.equal(idx[:, 0], cos.argmax(1)) and torch.allclose(sim[:, 0], cos.max(1).values)
    assert len(set(idx[:, 0].tolist())) > 1   # the random queries pick different keys: no vote at test
    idx, _ = method.select(q, 12)         # training on task 12 >= pool size 10: falls back to the query, voted
    assert (idx == idx[0]).all()
    vote, _ = make_method(DualPrompt, DualPromptConfig(**SYNTH, test_batch_vote=True))
    idx, _ = vote.select(q, None)
    assert (idx == idx[0]).all()


def test_learn_predict_and_state_round_trip():
    torch.manual_seed(0)
    method, tasks = make_method(DualPrompt, DualPromptConfig(**SYNTH, epochs=1))
    backbone0 = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    method.learn(tasks[0])
    assert all(torch.equal(backbone0[k], v) for k, v in method.backbone.state_dict().items())
    batch = next(iter(tiny_data().test_view(tasks[0].stop, 16)))
    out = method.predict(batch)
    assert out.shape == (len(batch.labels), tasks[0].stop)
    fresh, _ = make_method(DualPrompt, DualPromptConfig(**SYNTH, epochs=1))
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.predict(batch), out)


def test_bad_layers_are_config_errors():
    with pytest.raises(ConfigError):
        DualPromptConfig(g_layers=(0, 1), e_layers=(1, 2))
    with pytest.raises(ConfigError):
        make_method(DualPrompt, DualPromptConfig(e_layers=(2, 3, 4)))   # the tiny ViT has 4 blocks


def test_the_pilot_preset_is_the_default_and_pins_pilots_recipe():
    c = DualPromptConfig()
    assert (c.preset, c.head_init, c.clip_grad, c.shared_pool, c.vote_ties) == ("pilot", "trunc_normal", 0.0, True,
                                                                                "pilot")
    old = DualPromptConfig(preset="cilbench-0.1")
    assert (old.head_init, old.clip_grad, old.shared_pool, old.vote_ties) == ("linear", 1.0, False, "lowest")


def test_shared_pool_starts_task_t_from_task_t_minus_1s_e_prompt(monkeypatch):
    import cilbench.methods.common.prompts as prompts

    seen = []
    monkeypatch.setattr(prompts, "fit", lambda *a, **k: seen.append(method.e_prompt.detach().clone()))
    method, tasks = make_method(DualPrompt, DualPromptConfig(**SYNTH))
    before = method.e_prompt.detach().clone()
    method.learn(tasks[0])
    torch.testing.assert_close(seen[0], before)                  # task 0: no copy
    with torch.no_grad():
        method.e_prompt[:, :, 0] += 1.0                         # as if task 0 had trained its slot
    method.learn(tasks[1])
    assert torch.equal(seen[1][:, :, 1], seen[1][:, :, 0])        # slot 1 = slot 0 when task 1 starts
    assert torch.equal(seen[1][:, :, 2:], before[:, :, 2:])
    plain, tasks = make_method(DualPrompt, DualPromptConfig(**SYNTH, shared_pool=False))
    seen.clear()
    method = plain
    plain.learn(tasks[0]), plain.learn(tasks[1])
    assert not torch.equal(seen[1][:, :, 1], seen[1][:, :, 0])


def test_pilot_prefix_reshape_reproduces_the_reference_bug():
    from cilbench.methods.dualprompt import e_prefixes

    e = torch.arange(1 * 2 * 4 * 1 * 1, dtype=torch.float).view(1, 2, 4, 1, 1)   # value = 4·kv + slot
    idx = torch.tensor([[0], [1], [2], [3]])                                       # sample b picks slot b
    right = e_prefixes(e, idx)[0, :, :, 0, 0]                                      # (B, 2)
    assert right.tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]                     # (key_b, value_b)
    bug = e_prefixes(e, idx, pilot_reshape=True)[0, :, :, 0, 0]
    # PILOT reshapes (kv, B) as (B, kv): rows 0-1 get key halves of samples (0,1), (2,3); rows 2-3 value halves
    assert bug.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
