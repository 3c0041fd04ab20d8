"""Read run folders and aggregate them into leaderboards.

Every metric is recomputed from the run's stored matrix and counts (``cilbench.metrics``). Runs are
grouped by (benchmark, method) and then by every setting that can change a number: method, backbone
and run settings (``eval_every``, ``eval_batch_size``, ``online_iters``, ``precision``, ``threads``,
...) and the code version. Runs of one method that differ in any of them get their own rows, labelled
with what differs, ``care (method.ca_stats=lowrank)``; a protocol departure a method flags (PILOT's
test-batch vote) is tagged on every row, ``l2p [test-batch vote]``. A row aggregates finished runs
over seeds and class orders (``--split-orders`` keeps orders apart) as mean ± sample standard
deviation (ddof = 1; blank for one run), with the seeds, the orders and n shown; the same seed and
order run twice counts once (the newest). Unfinished runs are never averaged with finished ones: each
appears on its own row, marked "incomplete (k/T)".
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from cilbench.config import NOT_RESULT_SETTINGS
from cilbench.errors import CilbenchError
from cilbench.metrics import Record, summarize
from cilbench.results import RunDir

PUBLISHED = Path(__file__).resolve().parent / "reference" / "published.csv"

# leaderboard column -> label in Markdown / rich. Every accuracy column is recomputed from the stored
# matrix and counts (cilbench.metrics), so a metric fix applies to old runs too.
METRICS = {
    "avg_inc_acc": "Ā",
    "last_acc": "last acc",
    "forgetting_pilot": "forgetting (PILOT)",
    "forgetting_chaudhry": "forgetting (Chaudhry)",
    "forgetting_avalanche": "forgetting (Avalanche)",
    "bwt": "BWT",
    "avg_inc_acc_task_mean": "Ā (task mean)",
    "last_top5": "last top-5",
    "trainable_params": "trainable params",
    "added_params": "added params",
    "stored_numbers": "stored numbers",
    "train_s": "train s",
    "eval_s": "eval s",
    "peak_cuda_mem_mb": "peak CUDA mem MB",
    "process_peak_rss_mb": "process peak RSS MB",
}
MB_OR_SECONDS = ("train_s", "eval_s", "peak_cuda_mem_mb", "process_peak_rss_mb")
# run settings that cannot change a number (config.NOT_RESULT_SETTINGS); seeds are what a row aggregates over
NOT_A_SETTING = {*(f"run.{k}" for k in NOT_RESULT_SETTINGS), "run.seed"}
ORDER_KEY = "run.order_seed"


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
    settings: dict = field(default_factory=dict)   # every setting that can change a number, flattened
    order_seed: int = 1993
    tags: tuple[str, ...] = ()                     # protocol departures (method.flagged_settings)
    mtime: float = 0.0
    code: str = "unrecorded"                       # the code version(s) as people read them (git commit)


def code_identity(summary: dict) -> str:
    """What tells code versions apart: the sources' SHA-256 (prefix) of every version the run ran under,
    so two commits that differ only outside the sources (docs, tests) count as the same code."""
    history = summary.get("code_history") or ([summary["code"]] if "code" in summary else [])
    return " -> ".join(f"src:{c['sources_sha256'][:10]}" for c in history) or "unrecorded"


def _settings(path: Path, code: str) -> dict:
    """method.*, backbone.* and run.* settings of the run (minus NOT_A_SETTING) and its code identity.
    Settings a run predates take the value that reproduces its behaviour (``added_settings``), else the
    current default, so old runs still separate into variants; removed settings whose stored value
    is what the code now does (``removed_settings``) are dropped."""
    cfg_file = path / "config.toml"
    cfg = tomllib.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    sections = {"method": cfg.get("method_config", {}), "backbone": cfg.get("backbone", {}), "run": cfg.get("run", {})}
    recorded = {f"{sec}.{k}": v for sec, values in sections.items() for k, v in values.items()}
    for key, value in _removed(cfg.get("method", "")).items():     # settings that no longer exist
        if recorded.get(f"method.{key}") == value:
            del recorded[f"method.{key}"]
    settings = {**_defaults(cfg.get("method", "")), **recorded, "code": code}
    return {k: v for k, v in settings.items() if k not in NOT_A_SETTING}


def _defaults(method: str) -> dict:
    import dataclasses

    from cilbench.config import ADDED_SETTINGS, RunSettings
    from cilbench.registry import METHODS

    out = {f"run.{f.name}": f.default for f in dataclasses.fields(RunSettings)}
    out.update({f"run.{k}": v for k, v in ADDED_SETTINGS["run"].items()})
    out.update({f"backbone.{k}": v for k, v in ADDED_SETTINGS["backbone"].items()})
    if method in METHODS.names():
        cls = METHODS.get(method)
        out.update({f"method.{f.name}": (list(f.default) if isinstance(f.default, tuple) else f.default)
                    for f in dataclasses.fields(cls.Config) if f.default is not dataclasses.MISSING})
        out.update({f"method.{k}": v for k, v in cls.added_settings.items()})
    return out


def _removed(method: str) -> dict:
    from cilbench.registry import METHODS

    return METHODS.get(method).removed_settings if method in METHODS.names() else {}


def _tags(method: str, settings: dict) -> tuple[str, ...]:
    from cilbench.registry import METHODS

    if method not in METHODS.names():
        return ()
    own = {k.split(".", 1)[1]: v for k, v in settings.items() if k.startswith("method.")}
    return tuple(METHODS.get(method).table_tags(own))


def _flagged_keys(method: str) -> set[str]:
    from cilbench.registry import METHODS

    return {f"method.{k}" for k in METHODS.get(method).flagged_settings} if method in METHODS.names() else set()


def label_variants(runs: list[Run], split_orders: bool = False) -> list[Run]:
    """Name each run ``method [tags] (k=v, ...)``: its protocol tags, then the settings that differ
    within its (benchmark, method) group, so runs that are not comparable never share a row. The
    class-order seed separates rows only with ``split_orders``; otherwise a row aggregates over it."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.benchmark, r.method), []).append(r)
    out = []
    for r in runs:
        group = groups[(r.benchmark, r.method)]
        keys = set.intersection(*(set(g.settings) for g in group)) - _flagged_keys(r.method)
        if not split_orders:
            keys.discard(ORDER_KEY)
        differing = sorted(k for k in keys if len({repr(g.settings[k]) for g in group}) > 1)
        name = r.method + "".join(f" [{t}]" for t in r.tags)
        if differing:
            name += " (" + ", ".join(f"{k}={r.settings[k]}" for k in differing) + ")"
        out.append(replace(r, method=name))
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


def load_record(events: list[dict]) -> Record:
    """The run's record from its events: per-cell counts where the run kept them, else (runs from
    before counts were kept) the per-task accuracies and the stored A_t."""
    t = len(events)
    evaluated = [e for e in events if e.get("per_task") is not None]
    if all("n" in e for e in evaluated):
        n, c1, c5 = (np.full((t, t), np.nan) for _ in range(3))
        for e in evaluated:
            k = len(e["n"])
            n[e["task"], :k], c1[e["task"], :k], c5[e["task"], :k] = e["n"], e["correct"], e["correct5"]
        return Record.from_counts(n, c1, c5)
    a, acc, top5 = np.full((t, t), np.nan), np.full(t, np.nan), np.full(t, np.nan)
    for e in evaluated:
        a[e["task"], : len(e["per_task"])] = [np.nan if x is None else x for x in e["per_task"]]
        acc[e["task"]], top5[e["task"]] = e["acc"], e["top5"]
    return Record(a=a, acc=acc, top5=top5)


def memory_columns(summary: dict) -> dict:
    """Peak CUDA memory and process peak RSS; runs from before the split stored one ``peak_mem_mb``,
    which meant the CUDA peak on a CUDA device and the process RSS otherwise."""
    if "peak_mem_mb" not in summary:
        return {k: summary.get(k) for k in ("peak_cuda_mem_mb", "process_peak_rss_mb")}
    on_cuda = str(summary.get("device", "cpu")).startswith("cuda")
    return {"peak_cuda_mem_mb": summary["peak_mem_mb"] if on_cuda else None,
            "process_peak_rss_mb": None if on_cuda else summary["peak_mem_mb"]}


def load_run(path: Path) -> Run:
    rd = RunDir(path)
    s = rd.read_summary()
    record = load_record(rd.read_events())
    cost = s["cost"]
    n = s["metrics"]["n_tasks"]
    metrics = summarize(record, n)
    values = {**{k: metrics[k] for k in METRICS if k in metrics},
              "trainable_params": cost["trainable"], "added_params": cost["added"],
              "stored_numbers": cost.get("stored", 0),
              "train_s": s["learn_s_total"], "eval_s": s["eval_s_total"], **memory_columns(s)}
    values = {k: (np.nan if v is None else float(v)) for k, v in values.items()}
    settings = _settings(path, code_identity(s))
    order = int(settings.get(ORDER_KEY, s.get("order_seed", 1993)))
    return Run(path, s["benchmark"], s["method"], int(s["seed"]), s["status"] == "finished",
               metrics["tasks_done"], n, values, record.seen_accuracy(), record.a, settings, order,
               _tags(s["method"], settings), (path / "summary.json").stat().st_mtime,
               s.get("code_version", "unrecorded"))


def deduplicate(runs: list[Run]) -> tuple[list[Run], list[Path]]:
    """Keep the newest finished run of each (benchmark, labelled method, seed, order seed): the same
    run made twice is one sample, not two. Returns the kept runs and the dropped folders."""
    newest: dict[tuple, Run] = {}
    for r in runs:
        if r.finished:
            key = (r.benchmark, r.method, r.seed, r.order_seed)
            if key not in newest or r.mtime > newest[key].mtime:
                newest[key] = r
    kept = [r for r in runs if not r.finished or newest[(r.benchmark, r.method, r.seed, r.order_seed)] is r]
    return kept, [r.path for r in runs if r not in kept]


def leaderboard(runs: list[Run], split_orders: bool = False) -> pd.DataFrame:
    """One row per (benchmark, method variant) over finished runs (mean ± std over seeds and class
    orders; ``n`` runs), plus one row per unfinished run. Duplicated seeds count once."""
    return aggregate(deduplicate(label_variants(runs, split_orders))[0])


def aggregate(runs: list[Run]) -> pd.DataFrame:
    """The leaderboard of runs already labelled (``label_variants``) and de-duplicated."""
    rows = []
    frame = pd.DataFrame([{"benchmark": r.benchmark, "method": r.method, "seed": r.seed, "order": r.order_seed,
                           "finished": r.finished, "tasks_done": r.tasks_done, "n_tasks": r.n_tasks,
                           **r.values} for r in runs])
    if frame.empty:
        return pd.DataFrame(columns=["benchmark", "method", "status", "seeds", "orders", "n"])
    for (bench, method), g in frame.groupby(["benchmark", "method"], sort=True):
        done = g[g.finished]
        if len(done):
            row = {"benchmark": bench, "method": method, "status": "complete",
                   "seeds": ",".join(str(s) for s in sorted(set(done.seed))),
                   "orders": ",".join(str(s) for s in sorted(set(done.order))), "n": len(done)}
            for k in METRICS:
                row[k] = done[k].mean()
                row[f"{k}_std"] = done[k].std(ddof=1) if len(done) > 1 else np.nan
            rows.append(row)
        for _, r in g[~g.finished].iterrows():
            row = {"benchmark": bench, "method": method, "status": f"incomplete ({r.tasks_done}/{r.n_tasks})",
                   "seeds": str(r.seed), "orders": str(r.order), "n": 1}
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
    df = df.assign(method=df.method + " (published)", status="published: " + df.source, seeds="", orders="", n=0)
    return df.drop(columns="source")


def format_cell(mean: float, std: float, key: str) -> str:
    if mean is None or (isinstance(mean, float) and np.isnan(mean)):
        return "-"
    if key.endswith("params") or key == "stored_numbers":
        return f"{mean / 1e6:.3f} M" if mean >= 1e4 else f"{int(mean):,}"
    text = f"{mean:.2f}" if key not in MB_OR_SECONDS else f"{mean:.1f}"
    if std is not None and not np.isnan(std):
        text += f" ± {std:.2f}" if key not in MB_OR_SECONDS else f" ± {std:.1f}"
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
                        "seeds": df.seeds, "orders": df.orders, "n": df.n, "status": df.status})
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


@dataclass(frozen=True)
class Comparison:
    """What ``write_comparison`` wrote and the rows behind it."""
    table: pd.DataFrame        # the display table (strings), as in leaderboard.md
    board: pd.DataFrame        # the numeric leaderboard, as in leaderboard.csv
    runs: list[Run]            # the runs it aggregated, labelled as in the tables
    files: list[Path]          # everything written under ``out``
    dropped: list[Path]        # run folders left out as repeats of a newer run


def write_comparison(runs: list[Run], out: Path, with_published: bool = False,
                     split_orders: bool = False) -> Comparison:
    """leaderboard.csv / leaderboard.md and plots under ``out``."""
    from cilbench.ioutil import atomic_write_text
    from cilbench.metrics import forgetting_curve
    from cilbench.report import cost_vs_accuracy, heatmap, method_colors, method_curves

    runs, dropped = deduplicate(label_variants(runs, split_orders))
    board = aggregate(runs)
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
            files += heatmap(r.matrix, f"{r.method} on {bench} (seed {r.seed}, order {r.order_seed})",
                             plots / "heatmaps" / slug(f"{bench}__{r.method}__s{r.seed}__o{r.order_seed}"))
    return Comparison(table, board, runs, files, dropped)
