import pytest

from cilbench import config as C
from cilbench.errors import ConfigError
from cilbench.registry import BENCHMARKS, METHODS
from cilbench.runner import RunRequest, resolve


def test_unknown_method_lists_close_matches():
    with pytest.raises(ConfigError) as e:
        METHODS.get("simplecl")
    assert "did you mean 'simplecil'" in str(e.value) and "finetune" in str(e.value)


def test_unknown_benchmark_lists_close_matches():
    with pytest.raises(ConfigError) as e:
        BENCHMARKS.get("ob1k-30")
    assert "ob1k-301" in str(e.value)


def test_registries_have_descriptions():
    assert {"simplecil", "finetune", "joint"} <= set(METHODS.names())
    assert all(e.description for e in METHODS.entries())
    assert all(e.description for e in BENCHMARKS.entries())


def test_set_parsing_types():
    out = C.parse_set(["method.lr=0.5", "run.seed=3", "backbone.weights=none", "method.schedule=every"])
    assert out == {"method": {"lr": 0.5, "schedule": "every"}, "run": {"seed": 3}, "backbone": {"weights": "none"}}
    with pytest.raises(ConfigError, match="section.key=value"):
        C.parse_set(["lr=0.5"])
    with pytest.raises(ConfigError, match="unknown section"):
        C.parse_set(["model.lr=0.5"])


def test_layers_precedence_and_validation(tmp_path, monkeypatch):
    r = resolve(RunRequest("finetune", "tiny-3", sets=["method.lr=0.5"], out=str(tmp_path)))
    assert r.method_cfg.lr == 0.5
    assert r.method_cfg.epochs == 5  # synthetic default of finetune
    cfg = tmp_path / "cilbench.toml"
    cfg.write_text("[methods.finetune]\nepochs = 2\nlr = 0.2\n[run]\neval_every = 2\n")
    r = resolve(RunRequest("finetune", "tiny-3", config_path=str(cfg), sets=["method.lr=0.3"]))
    assert (r.method_cfg.epochs, r.method_cfg.lr, r.run.eval_every) == (2, 0.3, 2)


@pytest.mark.parametrize("sets,match", [
    (["method.lrr=0.1"], "(?s)unknown key 'lrr'.*did you mean 'lr'"),
    (["method.epochs=1.5"], "wrong type"),
    (["method.epochs=-1"], "out of range"),
    (["run.device=tpu"], "not allowed"),
    (["method.schedule=sometimes"], "not allowed"),
])
def test_bad_values_are_errors(sets, match):
    method = "joint" if "schedule" in sets[0] else "finetune"
    with pytest.raises(ConfigError, match=match):
        resolve(RunRequest(method, "tiny-3", sets=sets))


def test_unknown_section_in_user_config(tmp_path):
    cfg = tmp_path / "cilbench.toml"
    cfg.write_text("[trainer]\nlr = 1\n")
    with pytest.raises(ConfigError, match="unknown sections"):
        resolve(RunRequest("simplecil", "tiny-3", config_path=str(cfg)))


def test_every_shipped_benchmark_resolves_for_every_method():
    """The settings the benchmark files give each method are settings it has (a renamed or removed
    field would otherwise surface only when someone runs that benchmark)."""
    from cilbench.benchmark import REPO_BENCHMARKS, parse_benchmark_file
    from cilbench.registry import METHODS
    from cilbench.runner import RunRequest, resolve

    checked = 0
    for path in sorted(REPO_BENCHMARKS.glob("*.toml")):
        for spec in parse_benchmark_file(path):
            for method in METHODS.names():
                resolve(RunRequest(method, spec.name, check_device=False))
                checked += 1
    assert checked >= 10 * 20
