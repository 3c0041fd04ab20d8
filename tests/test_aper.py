"""APER mechanics on the embedded tiny ViT and a 12-class synthetic benchmark."""
import pytest
import torch

from cilbench.config import build

from cilbench.errors import ConfigError
from cilbench.methods.aper import APER, APERConfig
from cilbench.methods.common.peft import SSF, AdapterHooks, PromptHooks, ssf_targets
from tests.helpers import make_method, tiny_data

FAST = dict(tuned_epoch=2, batch_size=16, init_lr=0.05)


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return [k for k, v in module.state_dict().items() if not torch.equal(before[k], v)]


def train_images(task):
    images, labels = [], []
    for b in task.train_loader(64, shuffle=False, augment=False):
        images.append(b.images)
        labels.append(b.labels)
    return torch.cat(images), torch.cat(labels)


@pytest.mark.parametrize("variant", ["adapter", "ssf", "vpt", "finetune"])
def test_first_task_adapts_only_the_tuner_then_everything_is_frozen(variant):
    torch.manual_seed(0)
    method, tasks = make_method(APER, APERConfig(variant=variant, **FAST))
    backbone0 = state(method.backbone)
    tuned0 = {k: v.clone() for k, v in method.adapted.tuned_state().items()}
    method.learn(tasks[0])
    assert not changed(backbone0, method.backbone), "the pre-trained branch must stay untouched"
    tuned1 = {k: v.clone() for k, v in method.adapted.tuned_state().items()}
    assert any(not torch.equal(tuned0[k], tuned1[k]) for k in tuned0), "the tuner did not train"
    method.learn(tasks[1])
    assert all(torch.equal(tuned1[k], v) for k, v in method.adapted.tuned_state().items())
    assert not any(p.requires_grad for m in method.modules().values() for p in m.parameters())


def class_means(feats, y, classes):
    return torch.stack([feats[y == c].mean(0) for c in classes])


def test_prototypes_are_class_means_of_concatenated_features():
    torch.manual_seed(0)
    method, tasks = make_method(APER, APERConfig(variant="adapter", **FAST))
    for t in tasks[:2]:
        method.learn(t)
    for t in tasks[:2]:
        x, y = train_images(t)
        with torch.no_grad():
            feats = torch.cat([method.backbone(x), method.adapted(x)], 1)
        assert torch.allclose(method.head.protos[t.start:t.stop], class_means(feats, y, t.classes), atol=1e-5)
    assert method.head.protos.shape == (tasks[1].stop, 2 * method.backbone.embed_dim)


def test_adapted_only_features_when_dual_branch_is_off():
    torch.manual_seed(0)
    method, tasks = make_method(APER, APERConfig(variant="vpt", dual_branch=False, **FAST))
    method.learn(tasks[0])
    x, y = train_images(tasks[0])
    with torch.no_grad():
        expected = class_means(method.adapted(x), y, tasks[0].classes)
    assert torch.allclose(method.head.protos, expected, atol=1e-5)


def test_prediction_is_cosine_to_prototypes_and_state_round_trips():
    torch.manual_seed(0)
    method, tasks = make_method(APER, APERConfig(variant="ssf", **FAST))
    method.learn(tasks[0])
    method.learn(tasks[1])
    batch = next(iter(tiny_data().test_view(tasks[1].stop, 32)))
    logits = method.predict(batch)
    with torch.no_grad():
        f = torch.nn.functional.normalize(method._extract(batch.images), dim=1)
    assert torch.allclose(logits, f @ torch.nn.functional.normalize(method.head.protos, dim=1).T, atol=1e-5)
    fresh, _ = make_method(APER, APERConfig(variant="ssf", **FAST))
    fresh.load_state_dict(method.state_dict())
    assert torch.allclose(fresh.predict(batch), logits, atol=1e-6)


def test_fresh_tuners_leave_the_features_unchanged():
    torch.manual_seed(0)
    method, _ = make_method(APER, APERConfig(variant="adapter"))
    vit = method.backbone
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        plain = vit(x)
        assert torch.equal(vit(x, AdapterHooks(vit.embed_dim, vit.depth).eval()), plain)  # LoRA init: up = 0
        deep = vit(x, PromptHooks(vit.embed_dim, vit.depth, 5, deep=True))
        shallow = vit(x, PromptHooks(vit.embed_dim, vit.depth, 5, deep=False))
    assert deep.shape == shallow.shape == plain.shape
    assert not torch.allclose(deep, plain) and not torch.allclose(shallow, plain)
    ssf = SSF(vit.vit)
    assert len(ssf.scales) == 1 + 6 * vit.depth + 1 == len(ssf_targets(vit.vit))
    with torch.no_grad():
        assert torch.equal(vit(x), plain)  # inactive outside ``with ssf.active()``
        for p in ssf.scales.values():
            p.fill_(1.0)
        for p in ssf.shifts.values():
            p.zero_()
        with ssf.active():
            assert torch.allclose(vit(x), plain, atol=1e-6)
        next(iter(ssf.shifts.values())).fill_(0.5)
        with ssf.active():
            assert not torch.allclose(vit(x), plain)
        ssf.detach_hooks()
        with ssf.active():
            assert torch.equal(vit(x), plain)


def test_variant_defaults_follow_pilot_and_explicit_values_win():
    assert (APERConfig().tuned_epoch, APERConfig().batch_size, APERConfig().weight_decay) == (20, 48, 5e-4)
    ft = APERConfig(variant="finetune")
    assert (ft.tuned_epoch, ft.batch_size, ft.weight_decay) == (6, 128, 0.05)
    assert APERConfig(variant="finetune", tuned_epoch=3).tuned_epoch == 3
    with pytest.raises(ConfigError, match="method.ffn_num = 0 is out of range"):
        build(APERConfig, [("test", {"ffn_num": 0})])


def test_the_synthetic_schedule_raises_only_the_adapter_lr_and_only_on_synthetic_benchmarks():
    from cilbench.runner import RunRequest, resolve

    cfg = lambda bench, *sets: resolve(RunRequest("aper", bench, sets=list(sets))).method_cfg  # noqa: E731
    assert (cfg("synth-10").schedule, cfg("synth-10").init_lr) == ("synthetic", 0.2)
    assert cfg("synth-10", "method.variant=ssf").init_lr == 0.01
    assert (cfg("cifar-10").schedule, cfg("cifar-10").init_lr) == ("pilot", 0.01)  # real data: PILOT's
    assert (cfg("inr-10").schedule, cfg("inr-10").init_lr) == ("pilot-inr", 0.05)  # PILOT aper_adapter_inr.json
    assert cfg("synth-10", "method.init_lr=0.05").init_lr == 0.05                  # explicit wins


def test_at_the_synthetic_lr_the_adapter_moves_the_features():
    """The reason for the synthetic schedule: at PILOT's lr the adapter leaves the CLS feature as it was."""
    import torch.nn.functional as F

    cosines = []
    for lr in (0.01, 0.2):
        torch.manual_seed(0)
        method, tasks = make_method(APER, APERConfig(variant="adapter", init_lr=lr, tuned_epoch=8, batch_size=4))
        method.learn(tasks[0])
        batch = next(iter(tiny_data().test_view(tasks[0].stop, 64)))
        with torch.no_grad():
            cosines.append(F.cosine_similarity(method.backbone(batch.images), method.adapted(batch.images)).mean())
    assert cosines[0] > 0.999 and (1 - cosines[1]) > 20 * (1 - cosines[0])   # the synthetic lr moves it 20x more
