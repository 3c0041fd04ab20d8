"""A run folder: config.toml, environment.json (what produced it), protocol.json (class order),
events.jsonl, accuracy_matrix.csv with sample_counts.csv / top1_hits.csv / top5_hits.csv (every metric
derives from these), summary.json, curves.png, checkpoint/state.pt and log.txt. Every file except the append-only logs is written atomically.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomli_w
import tomllib

from cilbench.errors import CilbenchError
from cilbench.ioutil import atomic_torch_save, atomic_write_json, atomic_write_text

CHECKPOINT = "checkpoint/state.pt"


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    # ---- lifecycle -------------------------------------------------------------------------
    def status(self) -> str:
        """'new', 'finished' or 'unfinished'."""
        summary = self.path / "summary.json"
        if not self.path.exists() or not any(self.path.iterdir()):
            return "new"
        if summary.exists() and json.loads(summary.read_text()).get("status") == "finished":
            return "finished"
        return "unfinished"

    def prepare(self, config: dict[str, Any], force: bool, removed: dict[str, Any] | None = None,
                added: dict[str, Any] | None = None) -> bool:
        """Create or reopen the folder; returns True when an unfinished run should be resumed.
        ``removed``: method settings that no longer exist, with the stored value that means what the
        current code does (``Method.removed_settings``)."""
        state = self.status()
        if state == "unfinished":
            self.prune_temporaries()
        if state != "new" and force:
            shutil.rmtree(self.path)
            state = "new"
        if state == "finished":
            raise CilbenchError(f"run {self.path} is already finished",
                                "use `cilbench show` to read it, --force to run it again, or --name for a new run")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise CilbenchError(f"cannot write to {self.path}: {e.strerror}",
                                "choose a writable folder with --out or [output] root") from e
        if state == "unfinished" and (self.path / "config.toml").exists():
            if not self.holds(config, removed, added):
                raise CilbenchError(f"{self.path} holds an unfinished run with a different configuration",
                                    "resume with the same settings, or pass --force to start over")
            return (self.path / CHECKPOINT).exists()
        atomic_write_text(self.path / "config.toml", tomli_w.dumps(config))
        return False

    def holds(self, config: dict[str, Any], removed: dict[str, Any] | None = None,
              added: dict[str, Any] | None = None) -> bool:
        """Whether the folder's run was made with ``config``: where files live aside, settings added
        since (run settings, and the method's ``added``) at the value that reproduces the old
        behaviour, and ``removed`` method settings at the stored value that means what the code does."""
        path = self.path / "config.toml"
        if not path.exists():
            return False
        old = tomllib.loads(path.read_text())
        new = _without_added_settings(config, old)
        if "method_config" in new:
            stored = old.get("method_config", {})
            new = {**new, "method_config": {k: v for k, v in new["method_config"].items() if k in stored
                                            or k not in (added or {}) or added[k] != v}}
        return _comparable(old, removed or {}) == _comparable(new, {})

    def prune_temporaries(self) -> None:
        """Temporary files of writes a crash cut short (the renamed files are intact)."""
        for tmp in self.path.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    # ---- writing ---------------------------------------------------------------------------
    def log(self, message: str) -> None:
        with open(self.path / "log.txt", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def append_event(self, event: dict[str, Any]) -> None:
        with open(self.path / "events.jsonl", "a") as f:
            f.write(json.dumps(event, default=_plain) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_events(self, n: int) -> None:
        """Keep the first ``n`` events (those covered by the checkpoint being resumed)."""
        path = self.path / "events.jsonl"
        if path.exists():
            lines = path.read_text().splitlines(keepends=True)[:n]
            atomic_write_text(path, "".join(lines))

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.path / "summary.json", summary)

    def write_matrices(self, matrices: dict[str, np.ndarray], float_format: str = "%.4f") -> None:
        """``name.csv`` for each (T, T) matrix: rows after_t, columns task_j (NaN = undefined)."""
        for name, m in matrices.items():
            cols = [f"task_{j}" for j in range(m.shape[1])]
            df = pd.DataFrame(m, columns=cols, index=pd.Index([f"after_{t}" for t in range(m.shape[0])], name="row"))
            atomic_write_text(self.path / f"{name}.csv", df.to_csv(float_format=float_format))

    def write_json(self, name: str, doc: dict[str, Any]) -> None:
        atomic_write_json(self.path / name, doc)

    def read_json(self, name: str) -> dict[str, Any] | None:
        path = self.path / name
        return json.loads(path.read_text()) if path.exists() else None

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_torch_save(state, self.path / CHECKPOINT)

    def load_checkpoint(self) -> dict[str, Any]:
        import pickle

        import torch

        try:
            return torch.load(self.path / CHECKPOINT, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise CilbenchError(f"the checkpoint {self.path / CHECKPOINT} cannot be read ({e})",
                                "pass --force to start the run over") from e

    def note_skipped(self, skipped: dict[str, str]) -> bool:
        """Write skipped_images.txt; True when the list grew."""
        path = self.path / "skipped_images.txt"
        old = path.read_text().count("\n") if path.exists() else 0
        if len(skipped) == old:
            return False
        atomic_write_text(path, "".join(f"{p}\t{e}\n" for p, e in sorted(skipped.items())))
        return True

    # ---- reading ---------------------------------------------------------------------------
    def read_summary(self) -> dict[str, Any]:
        return json.loads((self.path / "summary.json").read_text())

    def read_events(self) -> list[dict[str, Any]]:
        path = self.path / "events.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _without_added_settings(config: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """``config`` minus the settings newer than the ``old`` run that keep their old behaviour, so a run
    started by an older cilbench resumes after an upgrade."""
    from cilbench.config import ADDED_SETTINGS

    out = dict(config)
    for section, added in ADDED_SETTINGS.items():
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items()
                            if k in old.get(section, {}) or k not in added or added[k] != v}
    return out


def _comparable(config: dict[str, Any], removed: dict[str, Any]) -> dict[str, Any]:
    from cilbench.config import NOT_RESULT_SETTINGS

    out = dict(config)
    if "method_config" in out:
        out["method_config"] = {k: v for k, v in out["method_config"].items() if k not in removed or removed[k] != v}
    if "run" in out:
        out["run"] = {k: v for k, v in out["run"].items() if k not in NOT_RESULT_SETTINGS}
    return out


def _plain(o: Any):
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(type(o))
