"""benchmarks/perf/gpu_check.py: its dry run without a GPU, its harness on the CPU, and its CUDA parts
(marked: skipped without a GPU, never passed)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: needs a GPU")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "perf" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module   # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is what a machine without CUDA does")
def test_without_cuda_it_is_a_dry_run_that_skips_every_cuda_part(gpu_check, capsys, tmp_path):
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no CUDA device: a dry run" in out
    for part in ("methods", "scaling", "determinism", "resume"):
        assert f"| {part} |" in out and "| skipped | no CUDA device |" in out
    assert "0 ok" in out and "4 skipped, 0 failed" in out


def test_a_failed_check_makes_the_exit_code_non_zero(gpu_check, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "check_repeat_and_resume",
                        lambda device, out: [gpu_check.Check("resume", "probe", "FAIL", "made to fail")])
    monkeypatch.setattr(gpu_check, "check_methods", lambda device, precisions, out: [])
    assert gpu_check.main(["--out", str(tmp_path), "--cpu-smoke"]) == 1
    assert "| resume | probe | FAIL | made to fail |" in capsys.readouterr().out


def test_the_repeat_and_resume_checks_pass_on_the_cpu(gpu_check, tmp_path):
    checks = gpu_check.check_repeat_and_resume("cpu", tmp_path)
    assert [(c.part, c.status) for c in checks] == [("determinism", "ok"), ("resume", "ok")]


@CUDA
def test_every_method_learns_two_tasks_on_cuda_in_every_precision(gpu_check, tmp_path):
    checks = gpu_check.check_methods("cuda", gpu_check.PRECISIONS, tmp_path)
    assert not [c for c in checks if c.status == "FAIL"], checks
    assert all(c.status == "ok" for c in checks if c.what.endswith("fp32"))


@CUDA
def test_care_sparse_and_dense_scale_to_301_tasks_on_cuda(gpu_check):
    checks = gpu_check.check_scaling("cuda")
    assert not [c for c in checks if c.status == "FAIL"], checks
    assert any(c.what == "CaRE sparse inference T=301" and c.status == "ok" for c in checks)


@CUDA
def test_runs_repeat_and_resume_bitwise_on_cuda(gpu_check, tmp_path):
    checks = gpu_check.check_repeat_and_resume("cuda", tmp_path)
    assert [(c.part, c.status) for c in checks] == [("determinism", "ok"), ("resume", "ok")]
