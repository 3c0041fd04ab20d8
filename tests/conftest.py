import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

TINY_BENCH = """
# As benchmarks/synth.toml: every benchmark here runs the embedded tiny ViT (4 blocks, 32 px) on 2 CPU cores: below
# each benchmark's own settings, the methods get block choices that exist in it and CPU-sized
# schedules (README "Notes on the design").
[methods.care]
tuned_epoch = 6
init_lr = 0.02
batch_size = 32
crct_epochs = 5

[methods.finetune]
epochs = 5
batch_size = 64

[methods.joint]
epochs = 10
batch_size = 64

[methods.aper]
schedule = "synthetic"   # the adapter's lr on the embedded ViT (methods/aper.py docstring)

[methods.dualprompt]
e_layers = [2, 3]        # ViT-B/16: 2-4

[methods.coda-prompt]
layers = [0, 1, 2, 3]    # ViT-B/16: 0-4

[methods.rwf]
blocks = 3

[dataset.tiny]
display = "Tiny synthetic"
source = "synthetic"
n_classes = 12
image_size = 32
train_per_class = 8
test_per_class = 4

[benchmark.tiny-3]
description = "12 synthetic classes, B4 Inc4"
dataset = "tiny"
init = 4
increment = 4

[benchmark.tiny-6]
description = "12 synthetic classes, B2 Inc2 (the kill tests)"
dataset = "tiny"
increment = 2

[benchmark.tiny-overlap]
description = "12 synthetic classes, B4 Inc4, each later task revisits 2 earlier classes"
dataset = "tiny"
init = 4
increment = 4
overlap = 0.5

[benchmark.tiny-ragged]
dataset = "tiny"
increment = 5
"""


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory):
    """Test benchmarks + a private cache; no user cilbench.toml."""
    root = tmp_path_factory.mktemp("cilbench")
    bench_dir = root / "benchmarks"
    bench_dir.mkdir()
    (bench_dir / "tiny.toml").write_text(TINY_BENCH)
    os.environ["CILBENCH_BENCHMARKS"] = str(bench_dir)
    os.environ["CILBENCH_CACHE"] = str(root / "cache")
    os.environ["CILBENCH_CONFIG"] = str(root / "absent.toml")
    os.environ.pop("CILBENCH_DATA", None)
    yield root


@pytest.fixture
def bench_dir(isolated_env) -> Path:
    return isolated_env / "benchmarks"
