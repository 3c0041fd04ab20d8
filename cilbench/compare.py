"""Read run folders and aggregate them into leaderboards.

Runs are grouped by (benchmark, method). Runs of one method whose settings differ (e.g. CaRE with
``ca_stats = "lowrank"`` beside the default) are told apart: the method is labelled with the
differing settings, ``care (method.ca_stats=lowrank)``, and each variant gets its own row. Finished runs of a group are aggregated over seeds as
mean ± sample standard deviation (ddof = 1; blank for a single seed). Unfinished runs are never
averaged with finished ones: each appears on its own row, marked "incomplete (k/T)".
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from cilbench.errors import CilbenchError
from cilbench.results import RunDir

PUBLISHED = Path(__file__).resolve().parent / "reference" / "published.csv"

# leaderboard column -> (source field, label in Markdown / rich)
METRICS = {
    "avg_inc_acc": "Ā",
    "last_acc": "last acc",
    "forgetting": "forgetting",
    "bwt": "BWT",
    "trainable_params": "trainable params",
    "added_params": "added params",
    "stored_numbers": "stored numbers",
    "train_s": "train s",
    "eval_s": "eval s",
    "peak_mem_mb": "peak mem MB",
}


@dataclass
class Run:
    path: Path
    benchmark: str
    method: str
    seed: int
    finished: bool
    tasks_done: int
    n_tasks: int
    values: dict[str, float]
    acc_curve: np.ndarray     # A_t per task (NaN = not evaluated)
    matrix: np.ndarray        # a[t][j]
    settings: dict = field(default_factory=dict)   # flattened method/backbone settings of the run


SETTING_SECTIONS = ("method_config", "backbone")


def _settings(path: Path) -> dict:
    cfg_file = path / "config.toml"
    if not cfg_file.exists():
        return {}
    cfg = tomllib.loads(cfg_file.read_text())
    settings = {f"{'method' if sec == 'method_config' else sec}.{k}": v
                for sec in SETTING_SECTIONS for k, v in cfg.get(sec, {}).items()}
    return {**_method_defaults(cfg.get("method", "")), **settings}


def _method_defaults(method: str) -> dict:
    """A method's current defaults, standing in for options added after an older run was made
    (new options default to the old behaviour), so such runs still separate into variants."""
    import dataclasses

    from cilbench.registry import METHODS

    if method not in METHODS.names():
        return {}
    return {f"method.{f.name}": (list(f.default) if isinstance(f.default, tuple) else f.default)
            for f in dataclasses.fields(METHODS.get(method).Config) if f.default is not dataclasses.MISSING}


def label_variants(runs: list[Run]) -> list[Run]:
    """Rename runs of the same (benchmark, method) whose settings differ to ``method (k=v, ...)``,
    with the settings that differ within the group (keys every run of the group records)."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.benchmark, r.method), []).append(r)
    out = []
    for r in runs:
        group = groups[(r.benchmark, r.method)]
        keys = set.intersection(*(set(g.settings) for g in group)) if group else set()
        differing = sorted(k for k in keys if len({repr(g.settings[k]) for g in group}) > 1)
        if differing:
            r = replace(r, method=f"{r.method} (" + ", ".join(f"{k}={r.settings[k]}" for k in differing) + ")")
        out.append(r)
    return out


def slug(text: str) -> str:
    return re.sub(r"[^\w.=+-]+", "_", text).strip("_")


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders among ``paths`` (a path may be a run folder or a folder of run folders)."""
    found = []
    for p in paths:
        p = Path(p)
        if (p / "summary.json").exists():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(q.parent for q in p.glob("*/summary.json")))
        else:
            raise CilbenchError(f"{p} does not exist", "pass run folders or a results folder")
    return found


def load_run(path: Path) -> Run:
    rd = RunDir(path)
    s = rd.read_summary()
    events = rd.read_events()
    m, cost = s["metrics"], s["cost"]
    n = m["n_tasks"]
    curve = np.full(len(events), np.nan)
    matrix = np.full((len(events), len(events)), np.nan)
    for e in events:
        if e.get("acc") is not None:
            curve[e["task"]] = e["acc"]
            matrix[e["task"], : len(e["per_task"])] = e["per_task"]
    values = {"avg_inc_acc": m["avg_inc_acc"], "last_acc": m["last_acc"], "forgetting": m["forgetting"],
              "bwt": m["bwt"], "trainable_params": cost["trainable"], "added_params": cost["added"],
              "stored_numbers": cost.get("stored", 0),
              "train_s": s["learn_s_total"], "eval_s": s["eval_s_total"], "peak_mem_mb": s["peak_mem_mb"]}
    values = {k: (np.nan if v is None else float(v)) for k, v in values.items()}
    return Run(path, s["benchmark"], s["method"], int(s["seed"]), s["status"] == "finished",
               m["tasks_done"], n, values, curve, matrix, _settings(path))


def leaderboard(runs: list[Run]) -> pd.DataFrame:
    """One row per (benchmark, method variant) over finished seeds, plus one row per unfinished run."""
    runs = label_variants(runs)
    rows = []
    frame = pd.DataFrame([{"benchmark": r.benchmark, "method": r.method, "seed": r.seed,
                           "finished": r.finished, "tasks_done": r.tasks_done, "n_tasks": r.n_tasks,
                           **r.values} for r in runs])
    if frame.empty:
        return pd.DataFrame(columns=["benchmark", "method", "status", "seeds"])
    for (bench, method), g in frame.groupby(["benchmark", "method"], sort=True):
        done = g[g.finished]
        if len(done):
            row = {"benchmark": bench, "method": method, "status": "complete",
                   "seeds": ",".join(str(s) for s in sorted(done.seed)), "n_seeds": len(done)}
            for k in METRICS:
                row[k] = done[k].mean()
                row[f"{k}_std"] = done[k].std(ddof=1) if len(done) > 1 else np.nan
            rows.append(row)
        for _, r in g[~g.finished].iterrows():
            row = {"benchmark": bench, "method": method,
                   "status": f"incomplete ({r.tasks_done}/{r.n_tasks})", "seeds": str(r.seed), "n_seeds": 1}
            for k in METRICS:
                row[k], row[f"{k}_std"] = r[k], np.nan
            rows.append(row)
    df = pd.DataFrame(rows)
    df["_complete"] = df.status == "complete"
    df = df.sort_values(["benchmark", "_complete", "last_acc"], ascending=[True, False, False], kind="stable")
    return df.drop(columns="_complete").reset_index(drop=True)


def published(benchmarks: list[str] | None = None) -> pd.DataFrame:
    df = pd.read_csv(PUBLISHED)
    if benchmarks is not None:
        df = df[df.benchmark.isin(benchmarks)]
    df = df.assign(method=df.method + " (published)", status="published: " + df.source, seeds="", n_seeds=0)
    return df.drop(columns="source")


def format_cell(mean: float, std: float, key: str) -> str:
    if mean is None or (isinstance(mean, float) and np.isnan(mean)):
        return "-"
    if key.endswith("params") or key == "stored_numbers":
        return f"{mean / 1e6:.3f} M" if mean >= 1e4 else f"{int(mean):,}"
    text = f"{mean:.2f}" if key not in ("train_s", "eval_s", "peak_mem_mb") else f"{mean:.1f}"
    if std is not None and not np.isnan(std):
        text += f" ± {std:.2f}" if key not in ("train_s", "eval_s", "peak_mem_mb") else f" ± {std:.1f}"
    return text


def with_label(method: str) -> str:
    """``rwf`` -> ``rwf: RwF-style (re-implementation)``: re-implementations say so in every table."""
    from cilbench.registry import METHODS

    name = method.split(" ")[0]
    if name not in METHODS.names() or method.endswith("(published)"):
        return method
    label = getattr(METHODS.get(name), "label", "")
    return f"{method}: {label}" if label else method


def display_table(df: pd.DataFrame) -> pd.DataFrame:
    """Human-readable strings ("mean ± std") for Markdown and rich."""
    out = pd.DataFrame({"method": [with_label(m) for m in df.method], "benchmark": df.benchmark,
                        "seeds": df.seeds, "status": df.status})
    for k, label in METRICS.items():
        std = df[f"{k}_std"] if f"{k}_std" in df else pd.Series(np.nan, index=df.index)
        out[label] = [format_cell(m, s, k) for m, s in zip(df[k], std)]
    return out


def to_markdown(table: pd.DataFrame) -> str:
    """GitHub Markdown without the optional ``tabulate`` dependency."""
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_comparison(runs: list[Run], out: Path, with_published: bool = False) -> tuple[pd.DataFrame, list[Path]]:
    """leaderboard.csv / leaderboard.md and plots under ``out``; returns the display table and files."""
    from cilbench.ioutil import atomic_write_text
    from cilbench.metrics import forgetting_curve
    from cilbench.report import cost_vs_accuracy, heatmap, method_colors, method_curves

    runs = label_variants(runs)
    board = leaderboard(runs)
    if with_published:
        board = pd.concat([board, published(sorted(set(board.benchmark)) or None)], ignore_index=True)
        board = board.sort_values(["benchmark", "last_acc"], ascending=[True, False], kind="stable")
    table = display_table(board)
    files = [out / "leaderboard.csv", out / "leaderboard.md"]
    atomic_write_text(files[0], board.to_csv(index=False, float_format="%.4f"))
    atomic_write_text(files[1], to_markdown(table))
    plots = out / "plots"
    for bench in sorted({r.benchmark for r in runs}):
        group = [r for r in runs if r.benchmark == bench]
        label = lambda r: r.method if r.finished else f"{r.method} [incomplete]"  # noqa: E731
        acc, forg = {}, {}
        for r in group:
            acc.setdefault(label(r), []).append(r.acc_curve)
            forg.setdefault(label(r), []).append(forgetting_curve(r.matrix))
        colors = method_colors(list(acc) + [r.method for r in group])
        files += method_curves(acc, f"{bench}: accuracy on all seen classes", "top-1 accuracy A_t (%)",
                               plots / f"{bench}_accuracy", colors=colors)
        files += method_curves(forg, f"{bench}: forgetting after each task", "forgetting F_t (%)",
                               plots / f"{bench}_forgetting", ylim=None, colors=colors)
        done = board[(board.benchmark == bench) & (board.status == "complete")]
        if len(done):
            files += cost_vs_accuracy(done.to_dict("records"), f"{bench}: cost vs accuracy",
                                      plots / f"{bench}_cost", colors=colors)
        for r in group:
            files += heatmap(r.matrix, f"{r.method} on {bench} (seed {r.seed})",
                             plots / "heatmaps" / slug(f"{bench}__{r.method}__s{r.seed}"))
    return table, files
