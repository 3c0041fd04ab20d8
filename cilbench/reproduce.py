"""`cilbench reproduce MANIFEST`: run what a paper's published cells need and say, cell by cell, how far
cilbench is from them.

A manifest (``benchmarks/reproduce/*.toml``) has a ``[manifest]`` table (name, paper, seeds, default
tolerance, decimals, settings for every run) and one ``[[cell]]`` per published number: table,
method (+ the paper's row label), benchmark, backbone tag, metric (``avg`` = Ā, ``last`` = A_B),
the published value, optionally its own tolerance, settings, a ``variant`` name (when settings
distinguish runs of one method) and a ``note`` (a label on anything ambiguous). Cells that need the
same run share it (Ā and A_B of one row). The runs go through `cilbench sweep`; the report compares
the mean over seeds, rounded to the paper's decimals, with the published value: within tolerance when
``|round(ours) - published| <= tolerance``.
"""
from __future__ import annotations

import fnmatch
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from cilbench.errors import ConfigError
from cilbench.results import RunDir

METRICS = {"avg": "avg_inc_acc", "last": "last_acc"}
METRIC_NAMES = {"avg": "Ā", "last": "A_B"}
CELL_KEYS = {"id", "table", "method", "label", "benchmark", "backbone", "metric", "published", "tolerance", "sets",
             "variant", "note"}
MANIFEST_KEYS = {"name", "paper", "seeds", "tolerance", "decimals", "sets"}


@dataclass(frozen=True)
class Cell:
    id: str
    table: str
    method: str
    label: str
    benchmark: str
    backbone: str
    metric: str
    published: float
    tolerance: float
    sets: tuple[str, ...] = ()
    variant: str = ""
    note: str = ""

    @property
    def run_key(self) -> tuple:
        """Cells with equal keys are read from the same runs."""
        return self.method, self.benchmark, self.backbone, self.sets, self.variant


@dataclass(frozen=True)
class Manifest:
    name: str
    paper: str
    seeds: tuple[int, ...]
    decimals: int
    sets: tuple[str, ...]
    cells: list[Cell] = field(default_factory=list)


def load_manifest(path: Path) -> Manifest:
    try:
        doc = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read manifest {path}: {e}", "pass a TOML file like benchmarks/reproduce/*.toml")
    head = doc.get("manifest", {})
    unknown = set(head) - MANIFEST_KEYS
    if unknown or set(doc) - {"manifest", "cell"}:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown | (set(doc) - {'manifest', 'cell'}))}",
                          f"a manifest has [manifest] ({', '.join(sorted(MANIFEST_KEYS))}) and [[cell]] tables")
    tolerance = float(head.get("tolerance", 1.0))
    cells, seen = [], set()
    for i, raw in enumerate(doc.get("cell", [])):
        where = f"{path} cell {i + 1}"
        unknown = set(raw) - CELL_KEYS
        missing = {"table", "method", "benchmark", "backbone", "metric", "published"} - set(raw)
        if unknown or missing:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}, missing {sorted(missing)}",
                              f"a cell takes {', '.join(sorted(CELL_KEYS))}")
        if raw["metric"] not in METRICS:
            raise ConfigError(f"{where}: metric = {raw['metric']!r}", "use \"avg\" (Ā) or \"last\" (A_B)")
        variant = raw.get("variant", "")
        cell_id = raw.get("id") or "-".join(x for x in (
            raw["table"].lower().replace("table ", "t").replace(" ", ""), raw["benchmark"], raw["method"], variant,
            raw["metric"]) if x)
        if cell_id in seen:
            raise ConfigError(f"{where}: a second cell {cell_id!r}", "give one of them its own id or variant")
        seen.add(cell_id)
        cells.append(Cell(cell_id, raw["table"], raw["method"], raw.get("label", raw["method"]), raw["benchmark"],
                          raw["backbone"], raw["metric"], float(raw["published"]),
                          float(raw.get("tolerance", tolerance)), tuple(raw.get("sets", [])), variant,
                          raw.get("note", "")))
    if not cells:
        raise ConfigError(f"{path} has no [[cell]]", "add one table per published number")
    return Manifest(head.get("name", Path(path).stem), head.get("paper", ""), tuple(head.get("seeds", [1993])),
                    int(head.get("decimals", 2)), tuple(head.get("sets", [])), cells)


def select(cells: list[Cell], patterns: list[str]) -> list[Cell]:
    """Cells whose id, or table, method or benchmark, matches one of the glob ``patterns`` (all if none)."""
    if not patterns:
        return cells
    chosen = [c for c in cells if any(fnmatch.fnmatch(x, p) for p in patterns
                                      for x in (c.id, c.table, c.method, c.benchmark))]
    if not chosen:
        raise ConfigError(f"no cell matches {patterns}", f"cell ids look like {cells[0].id}")
    return chosen


def implemented(cell: Cell) -> str:
    """"" when cilbench can run the cell, else why not."""
    from cilbench.registry import BENCHMARKS, METHODS

    if cell.method not in METHODS.names():
        return f"no cilbench implementation of {cell.label}"
    if cell.benchmark not in BENCHMARKS.names():
        return f"no benchmark {cell.benchmark} in cilbench"
    return ""


def grids(manifest: Manifest, cells: list[Cell], extra_sets: tuple[str, ...] = ()):
    """One sweep grid per distinct run of the runnable cells: {run key: Grid}."""
    from cilbench.sweep import Grid

    out = {}
    for cell in cells:
        if implemented(cell) or cell.run_key in out:
            continue
        settings = (*cell.sets, f"backbone.name={cell.backbone}")
        out[cell.run_key] = Grid((cell.method,), (cell.benchmark,), manifest.seeds,
                                 variants=((cell.variant, settings),), sets=(*manifest.sets, *extra_sets))
    return out


@dataclass(frozen=True)
class Row:
    cell: Cell
    ours: list[float]        # one value per finished run (seed)
    status: str              # "within" | "outside" | "missing" | why the cell cannot run

    @property
    def mean(self) -> float | None:
        return sum(self.ours) / len(self.ours) if self.ours else None

    @property
    def std(self) -> float | None:
        if len(self.ours) < 2:
            return 0.0 if self.ours else None
        m = self.mean
        return math.sqrt(sum((x - m) ** 2 for x in self.ours) / (len(self.ours) - 1))


def compare_cells(cells: list[Cell], runs: dict[tuple, list[Path]], decimals: int) -> list[Row]:
    rows = []
    for cell in cells:
        why = implemented(cell)
        if why:
            rows.append(Row(cell, [], why))
            continue
        values = [_metric(folder, cell.metric) for folder in runs.get(cell.run_key, [])]
        values = [v for v in values if v is not None]
        if not values:
            rows.append(Row(cell, [], "missing"))
            continue
        mean = sum(values) / len(values)
        within = abs(round(mean, decimals) - cell.published) <= cell.tolerance + 1e-9
        rows.append(Row(cell, values, "within" if within else "outside"))
    return rows


def _metric(folder: Path, metric: str) -> float | None:
    run = RunDir(folder)
    if run.status() != "finished":
        return None
    return float(run.read_summary()["metrics"][METRICS[metric]])


def report_table(rows: list[Row], decimals: int) -> list[dict]:
    out = []
    for r in rows:
        c = r.cell
        out.append({"cell": c.id, "table": c.table, "row": c.label, "benchmark": c.benchmark,
                    "metric": METRIC_NAMES[c.metric], "published": f"{c.published:.{decimals}f}",
                    "ours": "" if r.mean is None else f"{r.mean:.{decimals}f} ± {r.std:.{decimals}f} (n={len(r.ours)})",
                    "delta": "" if r.mean is None else f"{round(r.mean, decimals) - c.published:+.{decimals}f}",
                    "tolerance": f"±{c.tolerance:g}", "verdict": r.status, "note": c.note})
    return out


def plot(rows: list[Row], path: Path, title: str) -> None:
    """Published (x) vs ours (y), one point per cell with a result, the y = x line and the tolerance band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.mean is not None]
    if not done:
        return
    fig, ax = plt.subplots(figsize=(5, 5))
    xs, ys = [r.cell.published for r in done], [r.mean for r in done]
    lo, hi = min(xs + ys) - 2, max(xs + ys) + 2
    tol = max(r.cell.tolerance for r in done)
    ax.fill_between([lo, hi], [lo - tol, hi - tol], [lo + tol, hi + tol], color="0.9", label=f"±{tol:g}")
    ax.plot([lo, hi], [lo, hi], color="0.5", lw=1)
    colours = ["tab:green" if r.status == "within" else "tab:red" for r in done]
    ax.scatter(xs, ys, c=colours, s=18, zorder=3)
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="published (%)", ylabel="cilbench (%)", title=title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plan(manifest: Manifest, cells: list[Cell], specs: dict[tuple, list], calibration_runs: list[Path],
         tflops: float) -> tuple[list[list[str]], float]:
    """--dry-run: per cell its runs and their estimated hours (``cilbench.cost``); rows and total hours."""
    from cilbench import cost

    rows, total, hours_of = [], 0.0, {}
    for cell in cells:
        head = [cell.id, cell.label, cell.benchmark, METRIC_NAMES[cell.metric], f"{cell.published:.{manifest.decimals}f}"]
        why = implemented(cell)
        if why:
            rows.append([*head, why, "", ""])
            continue
        if cell.run_key not in hours_of:
            estimates = [cost.estimate_run(spec.config, calibration_runs, tflops) for spec in specs[cell.run_key]]
            known = [e.hours for e in estimates if e.hours is not None]
            hours_of[cell.run_key] = (sum(known) if len(known) == len(estimates) else None, estimates[0].basis)
            total += sum(known)
        hours, basis = hours_of[cell.run_key]
        rows.append([*head, ", ".join(s.run_id for s in specs[cell.run_key]),
                     "?" if hours is None else f"{hours:.3g}", basis])
    return rows, total


def write_report(folder: Path, manifest: Manifest, rows: list[Row]) -> list[dict]:
    """reproduce.csv, reproduce.md and reproduce.png in ``folder``; the table's rows."""
    import pandas as pd

    from cilbench.compare import to_markdown
    from cilbench.ioutil import atomic_write_text

    table = report_table(rows, manifest.decimals)
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(table)
    atomic_write_text(folder / "reproduce.csv", frame.to_csv(index=False))
    atomic_write_text(folder / "reproduce.md", f"# {manifest.paper}: published vs cilbench\n\n{to_markdown(frame)}")
    plot(rows, folder / "reproduce.png", f"{manifest.paper}: {sum(r.mean is not None for r in rows)} cells")
    return table
