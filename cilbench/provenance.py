"""What produced a run: the code version, the library versions, the device and the thread count.

The code's identity is a SHA-256 over cilbench's and the methods' sources, the shipped benchmark files
and the embedded weights (everything that can change a number), so it also tells apart uncommitted
edits. The git commit and a dirty flag are added when the package sits in a git work tree. A run
records this in ``environment.json``; a resume under other code is refused unless the user allows it,
and the run then lists every code version it ran under (``code_history``).
"""
from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
import sys
from pathlib import Path

import torch

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent
HASHED = (("cilbench", "*.py"), ("methods", "*.py"), ("benchmarks", "*.toml"), ("cilbench/assets", "*"))


@functools.lru_cache(maxsize=1)
def sources_sha256() -> str:
    digest = hashlib.sha256()
    for folder, pattern in HASHED:
        for path in sorted((REPO_ROOT / folder).rglob(pattern)):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0")
                digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _git() -> tuple[str, bool] | None:
    """(commit, dirty) of the work tree holding the package, or None outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != REPO_ROOT:
            return None
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--",
                         *(f"{folder}/{pattern}" for folder, pattern in HASHED)))
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None


def code_version() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("cilbench")
    except PackageNotFoundError:
        package = "unknown"
    out = {"package": package, "sources_sha256": sources_sha256()}
    git = _git()
    if git:
        out["git_commit"], out["git_dirty"] = git
    return out


def code_label(code: dict | None) -> str:
    """Short human name of a code version: ``3f2a9c1d07`` (+dirty), else ``v0.1.0 src:1a2b3c4d5e``."""
    if not code:
        return "unrecorded"
    if "git_commit" in code:
        return code["git_commit"][:10] + ("+dirty:" + code["sources_sha256"][:8] if code.get("git_dirty") else "")
    return f"v{code.get('package', '?')} src:{code['sources_sha256'][:10]}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}"


def environment(device: torch.device) -> dict:
    """Everything about the machine and libraries that can change a number."""
    import numpy
    import timm

    return {
        "code": code_version(),
        "python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__,
        "numpy": numpy.__version__, "cuda": torch.version.cuda, "platform": platform.platform(),
        "device": device_name(device), "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
