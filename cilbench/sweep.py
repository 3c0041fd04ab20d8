"""`cilbench sweep`: a grid of runs (methods × benchmarks × seeds × class orders × variants), run on one
machine or a SLURM cluster, resumable, and aggregated through `compare`.

Each run of the grid is one `cilbench run` command line, run in its own process (``local``, ``slurm``)
or in this one (``debug``, for pdb): the same code path as a single run; no model crosses a process
boundary. The sweep folder (``<out>/sweeps/<name>``) holds

- ``manifest.json``: the grid and, per run, its id, `cilbench run` arguments and folder;
- ``status.csv``: run id, state, attempts, failures, last task, wall s, job id, error, log (written
  atomically);
- ``logs/<run id>.<attempt>.log``: each attempt's output;
- ``leaderboard.*`` and ``plots/``: the aggregate over the finished runs (``compare``).

Re-running the same sweep skips finished runs, resumes unfinished ones from their per-task checkpoints
and retries a failed one while its failures stay within ``1 + retries`` (an interrupted attempt is no
failure: it resumes). One failing run never stops
the others; Ctrl-C stops launching and leaves every run resumable.
"""
from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import shlex
import subprocess
import sys
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from cilbench.errors import CilbenchError, ConfigError
from cilbench.ioutil import atomic_write_json, atomic_write_text
from cilbench.results import RunDir

STATUS_FIELDS = ("run_id", "state", "attempts", "failures", "last_task", "n_tasks", "wall_s", "job_id", "error",
                 "log")
SWEEP_KEYS = {"name", "methods", "benches", "seeds", "order_seeds", "set", "method_set", "variants", "online", "shots"}


@dataclass(frozen=True)
class Grid:
    """What to run: every combination of the lists; ``variants`` maps a name to extra ``--set``s
    (the name joins the run folder's name); ``sets`` apply to every run, ``method_sets`` to one
    method's runs (a setting one method lacks would be refused for the others)."""

    methods: tuple[str, ...]
    benches: tuple[str, ...]
    seeds: tuple[int, ...] = (1993,)
    order_seeds: tuple[int | None, ...] = (None,)
    variants: tuple[tuple[str, tuple[str, ...]], ...] = (("", ()),)
    sets: tuple[str, ...] = ()
    online: bool | None = None
    shots: int | None = None
    method_sets: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @classmethod
    def from_toml(cls, path: Path) -> "SweepFile":
        """A sweep file (``benchmarks/sweeps/*.toml``): ``name``, ``out`` (the runs' output root) and
        ``after`` (a command run once every run is done) aside, the top-level keys are one grid, or
        the defaults of each ``[[grid]]`` table (the runs are their union)."""
        try:
            doc = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read sweep file {path}: {e}", "pass a TOML file like benchmarks/sweeps/*.toml")
        tables = doc.pop("grid", None) or [{}]
        name, out, after = doc.pop("name", Path(path).stem), doc.pop("out", None), doc.pop("after", [])
        grids = [cls.from_dict(f"{path} grid {i + 1}", {**doc, **t}) for i, t in enumerate(tables)]
        return SweepFile(name, grids, Path(out) if out else None, tuple(after))

    @classmethod
    def from_dict(cls, where: str, doc: dict) -> "Grid":
        unknown = set(doc) - SWEEP_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}", f"allowed: {sorted(SWEEP_KEYS - {'name'})}")
        if not doc.get("methods") or not doc.get("benches"):
            raise ConfigError(f"{where} names no methods or no benches", "add methods = [...] and benches = [...]")
        variants = tuple((name, tuple(v)) for name, v in doc.get("variants", {}).items()) or (("", ()),)
        return cls(tuple(doc["methods"]), tuple(doc["benches"]), tuple(doc.get("seeds", [1993])),
                   tuple(doc.get("order_seeds", [None])), variants, tuple(doc.get("set", [])), doc.get("online"),
                   doc.get("shots"), tuple((m, tuple(v)) for m, v in doc.get("method_set", {}).items()))


@dataclass(frozen=True)
class SweepFile:
    name: str
    grids: list[Grid]
    out: Path | None = None              # the runs' output root (--out wins)
    after: tuple[str, ...] = ()          # a command run once every run is done (e.g. a report)


@dataclass(frozen=True)
class RunSpec:
    run_id: str                  # the run folder's name under the output root
    argv: tuple[str, ...]        # `cilbench run` arguments
    n_tasks: int
    config: dict | None = field(default=None, compare=False)   # what the run records (None: read back)
    removed: dict | None = field(default=None, compare=False)  # its method's removed_settings
    added: dict | None = field(default=None, compare=False)    # and added_settings

    def command(self) -> list[str]:
        return [sys.executable, "-m", "cilbench.cli", "run", *self.argv]


@dataclass
class RunStatus:
    run_id: str
    state: str = "queued"        # queued | running | done | failed | interrupted
    attempts: int = 0            # processes started for it
    failures: int = 0            # attempts that failed (not interrupted)
    last_task: int = 0
    n_tasks: int = 0
    wall_s: float = 0.0
    job_id: str = ""
    error: str = ""
    log: str = ""


def expand(grids: list[Grid], out: Path) -> list[RunSpec]:
    """The grids' runs, each resolved now: a bad method, benchmark or setting stops the sweep before
    anything starts."""
    specs = [spec for grid in grids for spec in _expand(grid, out)]
    ids = [s.run_id for s in specs]
    if len(set(ids)) != len(ids):
        raise ConfigError("two runs of the sweep would share a folder", "give each variant its own name")
    return specs


def _expand(grid: Grid, out: Path) -> list[RunSpec]:
    from cilbench.runner import RunRequest, resolve

    specs = []
    for bench, method, (variant, extra), order, seed in itertools.product(
            grid.benches, grid.methods, grid.variants, grid.order_seeds, grid.seeds):
        sets = [*grid.sets, *(x for m, v in grid.method_sets if m == method for x in v), *extra]
        req = RunRequest(method, bench, seed=seed, out=str(out), sets=sets, online=grid.online, shots=grid.shots,
                         order_seed=order, check_device=False)
        resolved = resolve(req)
        name = resolved.run_dir.name + (f"__{variant}" if variant else "")
        argv = ["--method", method, "--bench", bench, "--seed", str(seed), "--out", str(out), "--name", name]
        argv += [f"--order-seed={order}"] * (order is not None)
        argv += ["--online" if grid.online else "--no-online"] * (grid.online is not None)
        argv += [f"--shots={grid.shots}"] * (grid.shots is not None)
        for s in sets:
            argv += ["--set", s]
        cls = resolved.method_cls
        specs.append(RunSpec(name, tuple(argv), len(resolved.bench.splits), resolved.as_toml_dict(),
                             cls.removed_settings, cls.added_settings))
    return specs


def sweep_name(grids: list[Grid]) -> str:
    return "sweep-" + hashlib.sha1(json.dumps([asdict(g) for g in grids], sort_keys=True).encode()).hexdigest()[:10]


class Sweep:
    """A sweep folder: its manifest, its status table, and the states read back from the run folders."""

    def __init__(self, folder: Path, out: Path, specs: list[RunSpec]):
        self.folder, self.out, self.specs = Path(folder), Path(out), specs
        self.lock = threading.Lock()
        self.status = {s.run_id: RunStatus(s.run_id, n_tasks=s.n_tasks) for s in specs}
        self._judged: set[str] = set()   # finished runs checked against the grid by this process

    @classmethod
    def create(cls, folder: Path, out: Path, grids: list[Grid], specs: list[RunSpec]) -> "Sweep":
        sweep = cls(folder, out, specs)
        (sweep.folder / "logs").mkdir(parents=True, exist_ok=True)
        manifest = {"grids": [asdict(g) for g in grids],
                    "runs": [{"run_id": s.run_id, "argv": list(s.argv), "n_tasks": s.n_tasks} for s in specs]}
        old = sweep.folder / "manifest.json"
        if old.exists() and json.loads(old.read_text())["runs"] != manifest["runs"]:
            raise CilbenchError(f"{sweep.folder} holds another grid's sweep",
                                "re-run it with the same grid, or pass another --name")
        atomic_write_json(old, manifest)
        sweep._read_status()
        sweep.refresh()
        return sweep

    @classmethod
    def open(cls, folder: Path) -> "Sweep":
        path = Path(folder) / "manifest.json"
        if not path.exists():
            raise CilbenchError(f"{folder} is not a sweep folder (no manifest.json)",
                                "pass the folder `cilbench sweep` printed (<out>/sweeps/<name>)")
        m = json.loads(path.read_text())
        out = Path(folder).parent.parent          # a sweep folder is <out>/sweeps/<name>, wherever it is read from
        sweep = cls(folder, out, [RunSpec(r["run_id"], tuple(r["argv"]), r["n_tasks"]) for r in m["runs"]])
        sweep._read_status()
        sweep.refresh()
        return sweep

    def _read_status(self) -> None:
        path = self.folder / "status.csv"
        if not path.exists():
            return
        for row in csv.DictReader(io.StringIO(path.read_text())):
            if row["run_id"] in self.status:
                self.status[row["run_id"]] = RunStatus(
                    row["run_id"], row["state"], int(row["attempts"]), int(row["failures"]), int(row["last_task"]),
                    int(row["n_tasks"]), float(row["wall_s"]), row["job_id"], row["error"], row["log"])

    def refresh(self) -> None:
        """Tasks done and finished runs, from the run folders (the source of truth). A finished run
        made with other settings than the grid's is a ``conflict``: never counted, never overwritten.
        A run this process already judged is read again only if its folder lost its summary (the live
        table calls this every second)."""
        with self.lock:
            for s in self.specs:
                st, rd = self.status[s.run_id], RunDir(self.out / s.run_id)
                if s.run_id in self._judged and (rd.path / "summary.json").exists():
                    continue
                events = rd.path / "events.jsonl"
                st.last_task = sum(1 for line in events.read_text().splitlines() if line.strip()) if events.exists() else 0
                self._judged.discard(s.run_id)
                if rd.status() == "finished":
                    self._judged.add(s.run_id)
                    if s.config is None or rd.holds(s.config, s.removed, s.added):
                        st.state, st.error = "done", ""
                    else:
                        st.state, st.error = "conflict", "error: the folder holds a finished run with other settings"
                elif st.state in ("done", "conflict"):          # the folder was removed since
                    st.state = "queued"

    def save(self) -> None:
        with self.lock:
            buf = io.StringIO()
            w = csv.DictWriter(buf, STATUS_FIELDS)
            w.writeheader()
            for s in self.specs:
                w.writerow(asdict(self.status[s.run_id]))
            atomic_write_text(self.folder / "status.csv", buf.getvalue())

    def pending(self, retries: int) -> list[RunSpec]:
        """The runs left: not done, and failed at most ``retries`` times."""
        return [s for s in self.specs if self.status[s.run_id].state not in ("done", "conflict")
                and self.status[s.run_id].failures <= retries]

    def update(self, run_id: str, **changes) -> None:
        with self.lock:
            self.status[run_id] = replace(self.status[run_id], **changes)
        self.save()

    def finished_runs(self) -> list[Path]:
        return [self.out / s.run_id for s in self.specs if self.status[s.run_id].state == "done"]


# ---- backends --------------------------------------------------------------------------------
def run_local(sweep: Sweep, specs: list[RunSpec], max_parallel: int, retries: int,
              stop: threading.Event) -> None:
    """``max_parallel`` runs at a time, each a `cilbench run` subprocess with cores / max_parallel
    torch threads (``OMP_NUM_THREADS``; a run's own ``run.threads`` wins), so the machine is not
    oversubscribed; a failed run is retried at once while it has failed at most ``retries`` times.
    GPUs, when there are several, are shared out round-robin."""
    gpus = _gpu_count()
    env = {"OMP_NUM_THREADS": str(default_threads(max_parallel))}

    def one(spec: RunSpec, slot: int) -> None:
        while not stop.is_set():
            st = sweep.status[spec.run_id]
            attempt = st.attempts + 1
            log = sweep.folder / "logs" / f"{spec.run_id}.{attempt}.log"
            child_env = {**os.environ, **env}
            if gpus > 1:
                child_env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
            sweep.update(spec.run_id, state="running", attempts=attempt, log=str(log), error="", job_id="")
            t0 = time.time()
            with open(log, "w") as f:
                proc = subprocess.Popen(spec.command(), stdout=f, stderr=subprocess.STDOUT, env=child_env)
                sweep.update(spec.run_id, job_id=f"pid {proc.pid}")
                code = proc.wait()
            wall = sweep.status[spec.run_id].wall_s + time.time() - t0
            sweep.refresh()
            if code == 0:
                sweep.update(spec.run_id, state="done", wall_s=round(wall, 1))
                return
            error = _last_error(log)
            interrupted = stop.is_set() or code in (-2, 130) or error.startswith("error: interrupted")
            state = "interrupted" if interrupted else "failed"
            failures = sweep.status[spec.run_id].failures + (state == "failed")
            sweep.update(spec.run_id, state=state, wall_s=round(wall, 1), error=error, failures=failures)
            if state == "interrupted" or failures > retries:
                return

    with ThreadPoolExecutor(max_parallel) as pool:
        futures = [pool.submit(one, spec, i) for i, spec in enumerate(specs)]
        try:
            for f in futures:
                while not f.done():
                    time.sleep(0.2)
                f.result()
        except KeyboardInterrupt:
            stop.set()
            for f in futures:
                f.cancel()
            raise


def run_debug(sweep: Sweep, specs: list[RunSpec]) -> None:
    """In this process, one after another, exceptions raised (so pdb can catch them)."""
    from cilbench.cli import main

    for spec in specs:
        st = sweep.status[spec.run_id]
        sweep.update(spec.run_id, state="running", attempts=st.attempts + 1, job_id="in-process")
        t0 = time.time()
        try:
            code = main(["--debug", "run", *spec.argv])
        except KeyboardInterrupt:
            sweep.update(spec.run_id, state="interrupted")
            raise
        sweep.refresh()
        sweep.update(spec.run_id, state="done" if code == 0 else "failed", failures=st.failures + (code != 0),
                     wall_s=round(st.wall_s + time.time() - t0, 1))


def emit_sbatch(sweep: Sweep, specs: list[RunSpec], script: Path, partition: str, timeout_min: int,
                gpus_per_run: int, parallelism: int) -> Path:
    """A plain SLURM job array (no submitit needed): ``jobs.txt`` holds one `cilbench run` line per
    run; array task i runs line i. ``--requeue``: a pre-empted task resumes from its checkpoint."""
    jobs = sweep.folder / "jobs.txt"
    atomic_write_text(jobs, "".join(shlex.join(["cilbench", "run", *s.argv]) + "\n" for s in specs))
    lines = ["#!/bin/bash", f"#SBATCH --job-name=cilbench-{sweep.folder.name}",
             f"#SBATCH --array=0-{len(specs) - 1}%{parallelism}", f"#SBATCH --time={timeout_min}",
             f"#SBATCH --output={sweep.folder / 'logs'}/%A_%a.log", "#SBATCH --requeue"]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if gpus_per_run:
        lines.append(f"#SBATCH --gres=gpu:{gpus_per_run}")
    lines += ["set -euo pipefail", f"mapfile -t JOBS < {shlex.quote(str(jobs))}",
              'eval "${JOBS[$SLURM_ARRAY_TASK_ID]}"']
    atomic_write_text(script, "\n".join(lines) + "\n")
    return script


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no CUDA build
        return 0


def _last_error(log: Path) -> str:
    """The run's one-line cause (``error: ...``), else the last line of its output."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
    causes = [line for line in lines if line.startswith("error:")]
    return (causes[-1] if causes else lines[-1] if lines else "no output")[:200]


# ---- display ---------------------------------------------------------------------------------
def status_rows(sweep: Sweep) -> list[list[str]]:
    rows = []
    for s in sweep.specs:
        st = sweep.status[s.run_id]
        progress = f"{st.last_task}/{st.n_tasks}"
        rows.append([st.run_id, st.state, progress, str(st.attempts), f"{st.wall_s:.0f}", st.job_id, st.error])
    return rows


HEADER = ["run", "state", "tasks", "attempts", "wall s", "job", "error"]


def status_table(sweep: Sweep):
    from rich.table import Table

    counts = {}
    for st in sweep.status.values():
        counts[st.state] = counts.get(st.state, 0) + 1
    table = Table(title=f"sweep {sweep.folder.name}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    colours = {"done": "green", "running": "cyan", "failed": "red", "conflict": "red", "interrupted": "yellow"}
    for h in HEADER:
        table.add_column(h, no_wrap=h in ("run", "state"))
    for row in status_rows(sweep):
        c = colours.get(row[1])
        table.add_row(*([row[0], f"[{c}]{row[1]}[/]" if c else row[1], *row[2:]]))
    return table


class Watcher:
    """A live table on a terminal; plain lines at each state change otherwise."""

    def __init__(self, sweep: Sweep, console, interactive: bool):
        self.sweep, self.console, self.interactive = sweep, console, interactive
        self._stop, self._seen = threading.Event(), {}
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "Watcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._tick()

    def _loop(self) -> None:
        if self.interactive:
            from rich.live import Live

            with Live(status_table(self.sweep), console=self.console, refresh_per_second=2) as live:
                while not self._stop.wait(1.0):
                    self.sweep.refresh()
                    live.update(status_table(self.sweep))
        else:
            while not self._stop.wait(1.0):
                self._tick()

    def _tick(self) -> None:
        if self.interactive:
            return
        self.sweep.refresh()
        for row in status_rows(self.sweep):
            key = (row[1], row[3])
            if self._seen.get(row[0]) != key:
                self._seen[row[0]] = key
                extra = f" ({row[6]})" if row[6] else ""
                print(f"[sweep] {row[0]}: {row[1]}, tasks {row[2]}, attempt {row[3]}{extra}", flush=True)


def aggregate(sweep: Sweep):
    """The leaderboard and plots of the sweep's finished runs, in the sweep folder (``compare``)."""
    from cilbench.compare import load_run, write_comparison

    runs = [load_run(p) for p in sweep.finished_runs()]
    return write_comparison(runs, sweep.folder) if runs else None


def run_sweep(sweep: Sweep, backend: str, max_parallel: int, retries: int,
              slurm: dict | None = None, on_start: Callable[[], None] | None = None) -> dict[str, int]:
    """Run what is left of ``sweep`` on ``backend``; returns the count of runs per final state."""
    for st in sweep.status.values():       # a previous sweep process that died left these "running"
        if st.state == "running" and backend != "status":
            st.state = "interrupted"
    sweep.save()
    todo = sweep.pending(retries)
    if on_start:
        on_start()
    stop = threading.Event()
    try:
        if backend == "local":
            run_local(sweep, todo, max_parallel, retries, stop)
        elif backend == "debug":
            run_debug(sweep, todo)
        elif backend in ("slurm", "submitit-local"):
            from cilbench.sweep_submitit import run_submitit

            run_submitit(sweep, todo, backend, retries, **(slurm or {}))
        else:
            raise ConfigError(f"unknown backend {backend!r}", "use local, debug, slurm or submitit-local")
    finally:
        sweep.refresh()
        for st in sweep.status.values():
            if st.state == "running":
                st.state = "interrupted"
        sweep.save()
    counts: dict[str, int] = {}
    for st in sweep.status.values():
        counts[st.state] = counts.get(st.state, 0) + 1
    return counts


def split_sets(items: Iterable[str]) -> tuple[tuple[str, ...], tuple[tuple[str, tuple[str, ...]], ...]]:
    """``--set`` values: ``section.key=value`` for every run, ``METHOD:section.key=value`` for one method."""
    common, scoped = [], {}
    for item in items:
        head, sep, rest = item.partition(":")
        if sep and "=" not in head:
            scoped.setdefault(head, []).append(rest)
        else:
            common.append(item)
    return tuple(common), tuple((m, tuple(v)) for m, v in scoped.items())


def parse_variants(items: Iterable[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``--variant "lr01:method.lr=0.1,method.epochs=2"`` -> (("lr01", ("method.lr=0.1", ...)),)."""
    out = []
    for item in items:
        name, _, sets = item.partition(":")
        if not name or not sets or not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"--variant {item!r} is not NAME:SECTION.KEY=VALUE[,...]",
                              "e.g. --variant lr01:method.lr=0.1,method.epochs=2")
        out.append((name, tuple(s.strip() for s in sets.split(",") if s.strip())))
    return tuple(out) or (("", ()),)


def default_threads(max_parallel: int) -> int:
    return max(1, (os.cpu_count() or 1) // max_parallel)

