"""Assemble and execute one run: config -> data, backbone, method -> evaluator loop -> run folder."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cilbench import config as C
from cilbench.backbones.loader import load_backbone
from cilbench.benchmark import BenchmarkSpec, get_benchmark
from cilbench.data.folder_split import FolderLoading
from cilbench.data.sources import cache_dir, load_splits, loader_defaults
from cilbench.data.stream import ClassIncrementalData
from cilbench.errors import CilbenchError, ConfigError, suggest
from cilbench.evaluator import Evaluator, seed_everything
from cilbench.method import BenchmarkInfo, Method, OnlineProtocol, Reporter, RunContext
from cilbench.metrics import DEFINITIONS, as_json, summarize
from cilbench.provenance import code_label, environment
from cilbench.registry import METHODS
from cilbench.report import run_curves
from cilbench.results import RunDir


@dataclass
class RunRequest:
    method: str
    bench: str
    seed: int | None = None
    device: str | None = None
    data_root: str | None = None
    out: str | None = None
    name: str | None = None
    sets: list[str] = field(default_factory=list)
    config_path: str | None = None
    eval_every: int | None = None
    shots: int | None = None
    online: bool | None = None
    order_seed: int | None = None
    check_device: bool = True   # False: resolve a CUDA run on a machine without one (sweep listing, sbatch)


@dataclass
class ResolvedRun:
    bench: BenchmarkSpec
    method_cls: type
    method_cfg: Any
    run: C.RunSettings
    backbone: Any
    run_dir: Path

    def as_toml_dict(self) -> dict:
        return {"benchmark": self.bench.name, "method": self.method_cls.name,
                "run": C.as_dict(self.run), "backbone": C.as_dict(self.backbone),
                "method_config": C.as_dict(self.method_cfg)}


def resolve(req: RunRequest) -> ResolvedRun:
    bench = get_benchmark(req.bench)
    method_cls = METHODS.get(req.method)
    user = C.load_user_config(req.config_path)
    cli = C.parse_set(req.sets)
    run_layer = {**user.get("run", {})}
    if "root" in user.get("data", {}):
        run_layer["data_root"] = user["data"]["root"]
    if "cache" in user.get("data", {}):
        run_layer["cache_dir"] = user["data"]["cache"]
    if "root" in user.get("output", {}):
        run_layer["out_root"] = user["output"]["root"]
    flags = {k: v for k, v in {"seed": req.seed, "device": req.device, "data_root": req.data_root,
                               "out_root": req.out, "eval_every": req.eval_every, "shots": req.shots,
                               "online": req.online, "order_seed": req.order_seed}.items()
             if v is not None}
    if "root" in cli.get("data", {}):
        flags["data_root"] = cli["data"]["root"]
    env = {"data_root": os.environ["CILBENCH_DATA"]} if os.environ.get("CILBENCH_DATA") else {}
    run = C.build(C.RunSettings, [("cilbench.toml", run_layer), ("$CILBENCH_DATA", env),
                                  ("--set run.*", cli.get("run", {})), ("command line", flags)], "run")
    if run.online is None:  # the benchmark's protocol, else the method's own (RwF is an online method)
        run = dataclasses.replace(run, online=bench.online or method_cls.online)
    if run.order_seed is None:
        run = dataclasses.replace(run, order_seed=bench.order_seed)
    elif bench.class_order == "natural" and run.order_seed != bench.order_seed:
        raise ConfigError(f"{bench.name} keeps the classes in their natural (folder) order, so an order seed "
                          "has nothing to shuffle", f"drop --order-seed, or use a shuffled variant of {bench.name}")
    if run.train_cache and bench.dataset.source != "imagefolder":
        raise ConfigError(f"run.train_cache caches decoded ImageFolder files; {bench.dataset.display} is read "
                          f"from {bench.dataset.source} images held in memory", "drop run.train_cache")
    workers, pin, persistent = loader_defaults(run.device, run.num_workers, run.pin_memory, run.persistent_workers)
    run = dataclasses.replace(run, num_workers=workers, pin_memory=pin, persistent_workers=persistent)
    default_order = bench.order_seed
    bench = dataclasses.replace(bench, order_seed=run.order_seed)
    if req.check_device and run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but CUDA is not available here", "use --device cpu")
    user_methods = user.get("methods", {})
    for name in user_methods:
        if name not in METHODS.names():
            raise ConfigError(f"cilbench.toml: [methods.{name}] names no registered method",
                              suggest(name, METHODS.names()))
    method_cfg = C.build(method_cls.Config, [
        (f"benchmark {bench.name} [methods.{method_cls.name}]", bench.overrides_for(method_cls.name)),
        (f"cilbench.toml [methods.{method_cls.name}]", user_methods.get(method_cls.name, {})),
        ("--set method.*", cli.get("method", {}))])
    check_protocol(method_cls, method_cfg, run)
    backbone = C.build_backbone_config(bench.backbone, user.get("backbone", {}), cli.get("backbone", {}))
    order = f"__o{run.order_seed}" if run.order_seed != default_order else ""
    run_id = req.name or f"{protocol_label(bench.name, run).replace('+', '__')}__{method_cls.name}__s{run.seed}{order}"
    return ResolvedRun(bench, method_cls, method_cfg, run, backbone, Path(run.out_root) / run_id)


def check_protocol(method_cls: type, method_cfg: Any, run: C.RunSettings) -> None:
    """Every protocol setting is honoured or refused here, before anything runs: never ignored."""
    if not run.online and (run.online_iters != 1 or run.online_batch_size != 0):
        key = "run.online_iters" if run.online_iters != 1 else "run.online_batch_size"
        raise ConfigError(f"{key} applies to the online protocol only, and this run is offline",
                          f"add --online, or drop {key}")
    if run.precision != "fp32" and run.device != "cuda":
        raise ConfigError(f"run.precision={run.precision} takes effect through CUDA autocast only, and this run is "
                          f"on {run.device}", "use --device cuda, or run.precision=fp32")
    online = OnlineProtocol(run.online, run.online_batch_size, run.online_iters)
    for cause, remedy in method_cls.protocol_errors(method_cfg, online, run.precision):
        raise ConfigError(cause, remedy)


def protocol_label(bench: str, run: C.RunSettings) -> str:
    """The benchmark as tables show it: ``synth-10``, ``synth-10+5shot``, ``synth-301+online``."""
    return bench + (f"+{run.shots}shot" if run.shots else "") + ("+online" if run.online else "")


class _Interrupt(Exception):
    pass


class _Interrupts:
    """Ctrl-C / SIGTERM raise ``_Interrupt`` in the main thread, except inside ``deferred()``, where
    they wait until the block ends. The deferral is done at the Python level: blocking the signal with
    pthread_sigmask only blocks the calling thread, and torch's worker threads would take it instead."""

    def __init__(self):
        self.signum: int | None = None
        self._depth = 0

    def __enter__(self) -> "_Interrupts":
        self._old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def _on_signal(self, signum, frame) -> None:
        self.signum = signum
        if not self._depth:
            raise _Interrupt()

    @contextlib.contextmanager
    def deferred(self):
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self.signum is not None and not self._depth:
            raise _Interrupt()


def execute(resolved: ResolvedRun, reporter_factory=None, force: bool = False, resume_only: bool = False,
            allow_code_change: bool = False) -> RunDir:
    """Run (or resume) one run. ``resume_only`` refuses to start a run that has nothing to resume;
    a resume under other code than the run started with is refused unless ``allow_code_change``."""
    with _determinism(resolved.run.deterministic):
        return _execute(resolved, reporter_factory, force, resume_only, allow_code_change)


@contextlib.contextmanager
def _determinism(on: bool):
    """run.deterministic: torch's deterministic algorithms for this run only (CUDA's atomics-based kernels,
    e.g. index_add's backward, otherwise differ from run to run); the process's previous mode after it."""
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # read when cuBLAS starts
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


def _execute(resolved: ResolvedRun, reporter_factory, force: bool, resume_only: bool,
             allow_code_change: bool) -> RunDir:
    bench, run = resolved.bench, resolved.run
    if run.threads:
        torch.set_num_threads(run.threads)
    rd = RunDir(resolved.run_dir)
    state = rd.status()
    if resume_only and state != "unfinished":
        raise CilbenchError(f"--resume: {rd.path} holds no unfinished run (it is {state})",
                            "drop --resume to start a new run, or check --out and --name")
    resume = rd.prepare(resolved.as_toml_dict(), force=force, removed=resolved.method_cls.removed_settings,
                        added=resolved.method_cls.added_settings)
    device = torch.device(run.device)
    seed_everything(run.seed)
    loading = FolderLoading(run.num_workers, run.pin_memory, run.persistent_workers, run.decode_cache,
                            run.train_cache, cache_dir(run.cache_dir), run.device, log=rd.log)
    train, test = load_splits(bench.dataset, Path(run.data_root) if run.data_root else None, run.bad_images, loading)
    data = ClassIncrementalData(train, test, bench.n_classes, bench.splits, bench.order_seed, run.shots,
                                bench.test_shuffle_seed, natural_order=bench.class_order == "natural")
    normalize = {"dataset": bench.dataset.normalize, "on": True, "off": False}[resolved.backbone.normalize]
    backbone = load_backbone(resolved.backbone, normalize=normalize)
    if backbone.img_size != bench.dataset.image_size:
        raise ConfigError(f"backbone {backbone.name} expects {backbone.img_size}px images, "
                          f"{bench.dataset.display} is set up for {bench.dataset.image_size}px",
                          "pick a backbone for this benchmark (--set backbone.name=...)")
    n_tasks = len(bench.splits)
    reporter = reporter_factory(n_tasks) if reporter_factory else Reporter()
    ctx = RunContext(device=device, seed=run.seed, precision=run.precision, reporter=_MethodReporter(reporter, rd))
    method: Method = resolved.method_cls(resolved.method_cfg, ctx)
    info = BenchmarkInfo(bench.name, bench.n_classes, n_tasks, tuple(len(s) for s in bench.splits),
                         bench.dataset.image_size)
    method.setup(backbone, info)
    ev = Evaluator(method, data, ctx, run.eval_every, run.eval_batch_size,
                   OnlineProtocol(run.online, run.online_batch_size, run.online_iters))
    rd.write_json("protocol.json", {
        "benchmark": bench.name, "class_order_rule": bench.class_order, "order_seed": bench.order_seed,
        "test_shuffle_seed": bench.test_shuffle_seed,
        "class_order": data.order.tolist(),
        "tasks": [{"classes": [sp.start, sp.stop], "recurring": list(sp.recurring)} for sp in bench.splits]})
    ckpt = rd.load_checkpoint() if resume else None
    env = _record_environment(rd, device, resume, allow_code_change, ckpt["tasks_done"] if ckpt else 0)
    if ckpt is not None:
        ev.restore(ckpt)
        rd.truncate_events(ev.state.tasks_done)
        rd.log(f"resumed after task {ev.state.tasks_done}")
        reporter.log(f"resuming {rd.path} after task {ev.state.tasks_done}/{n_tasks}")
    else:
        rd.truncate_events(0)
        rd.log(f"start {bench.name} / {resolved.method_cls.name} seed {run.seed}")

    started = time.time()
    interrupts = _Interrupts()
    try:
        with interrupts, reporter:
            if ev.state.tasks_done == n_tasks:  # killed after the last checkpoint, before the summaries
                _write_summaries(rd, ev, rd.read_events()[-1], resolved, env, final=True)
            for t in range(ev.state.tasks_done, n_tasks):
                reporter.start_task(t)
                event = ev.run_task(t)
                with interrupts.deferred():
                    _save(rd, ev, event, resolved, env, final=t == n_tasks - 1)
                _report_skipped(rd, (train, test), reporter)
                acc = f"A_t {event['acc']:.2f}%" if event["acc"] is not None else "not evaluated"
                reporter.end_task(t, f"{acc} learn {event['learn_s']:.1f}s eval {event['eval_s']:.1f}s")
    except _Interrupt:
        rd.log(f"interrupted by signal {interrupts.signum} after task {ev.state.tasks_done}")
        raise CilbenchError(f"interrupted; tasks 1..{ev.state.tasks_done} of {n_tasks} are saved in {rd.path}",
                            "run the same command again to resume") from None
    rd.log(f"finished in {time.time() - started:.1f}s")
    return rd


def _record_environment(rd: RunDir, device: torch.device, resume: bool, allow_code_change: bool,
                        tasks_done: int) -> dict:
    """Write environment.json; on resume, refuse other code unless allowed, and then keep the history."""
    env = environment(device)
    old = rd.read_json("environment.json") if resume else None
    history = (old or {}).get("code_history", [])
    if resume and (not history or history[-1]["code"]["sources_sha256"] != env["code"]["sources_sha256"]):
        was = code_label(history[-1]["code"]) if history else "code that recorded no version"
        if not allow_code_change:
            raise CilbenchError(f"{rd.path} was started under {was}; this is {code_label(env['code'])}, and a "
                                "resumed run would mix the two",
                                "resume under the same code, pass --allow-code-change to continue and record "
                                "both versions, or --force to start over")
        history = [*history, {"from_task": tasks_done + 1, "code": env["code"]}]
        rd.log(f"code changed on resume: {was} -> {code_label(env['code'])}")
    if not history:
        history = [{"from_task": 1, "code": env["code"]}]
    env = {**env, "code_history": history}
    rd.write_json("environment.json", env)
    return env


def _save(rd: RunDir, ev: Evaluator, event: dict, resolved: ResolvedRun, env: dict, final: bool) -> None:
    """Event line, checkpoint, summaries (the caller defers Ctrl-C/SIGTERM until all are written).

    Every file is replaced atomically, so a failed write (disk full) or a SIGKILL leaves the previous
    task's files; the event log is truncated back to the checkpoint on resume.
    """
    try:
        rd.append_event(event)
        rd.save_checkpoint(ev.checkpoint_state())
        _write_summaries(rd, ev, event, resolved, env, final)
    except OSError as e:
        raise CilbenchError(f"could not write the results of task {ev.state.tasks_done} to {rd.path}: "
                            f"{e.strerror or e}; the files of the tasks before it are intact",
                            "free disk space (or fix the folder's permissions) and run the same command "
                            "again to resume") from e


class _MethodReporter(Reporter):
    """What a method reports through: epochs go to the console reporter; messages also go to the
    run's log.txt, so diagnostics (e.g. samoe's in-distribution shares) outlive the terminal."""

    def __init__(self, console: Reporter, rd: RunDir):
        self.console, self.rd = console, rd

    def epoch(self, epoch: int, epochs: int, loss: float | None = None) -> None:
        self.console.epoch(epoch, epochs, loss)

    def log(self, message: str) -> None:
        self.rd.log(message)
        self.console.log(message)


def _report_skipped(rd: RunDir, splits, reporter: Reporter) -> None:
    """With run.bad_images = "skip": list every skipped file in the run folder and say so once."""
    skipped = {p: e for split in splits for p, e in getattr(split, "skipped", {}).items()}
    if skipped and rd.note_skipped(skipped):
        reporter.log(f"skipped {len(skipped)} unreadable image(s); list in {rd.path / 'skipped_images.txt'}")


def peak_memory(events: list[dict]) -> dict:
    """The run's largest per-task CUDA peak (CUDA runs only) and the process's peak resident memory
    (the whole process: on CPU it includes the data and the Python heap)."""
    peaks = {k: [e[k] for e in events if e.get(k) is not None] for k in ("peak_cuda_mem_mb", "process_peak_rss_mb")}
    return {k: max(v) if v else None for k, v in peaks.items()}


def _write_summaries(rd: RunDir, ev: Evaluator, event: dict, resolved: ResolvedRun, env: dict, final: bool) -> None:
    s = ev.state
    d = s.tasks_done
    record = s.record()
    codes = [h["code"] for h in env["code_history"]]
    summary = {"status": "finished" if final else "running",
               "benchmark": protocol_label(resolved.bench.name, resolved.run),
               "method": resolved.method_cls.name, "seed": resolved.run.seed,
               "order_seed": resolved.run.order_seed,
               "tags": resolved.method_cls.table_tags(C.as_dict(resolved.method_cfg)),
               "metrics": as_json(summarize(record, s.n_tasks)), "metric_definitions": DEFINITIONS,
               "cost": event["cost"],
               "learn_s_total": round(s.learn_s_total, 3), "eval_s_total": round(s.eval_s_total, 3),
               **peak_memory(rd.read_events()),
               "code_version": " -> ".join(code_label(c) for c in codes), "code": codes[-1], "code_history": codes,
               "device": env["device"], "threads": env["threads"]}
    if final or s.n_tasks <= 60 or d % 10 == 0:
        rd.write_matrices({"accuracy_matrix": record.a})
        rd.write_matrices({"sample_counts": record.n, "top1_hits": record.c1, "top5_hits": record.c5}, "%.0f")
    if final:
        run_curves(record.a, record.seen_accuracy(), f"{resolved.method_cls.name} on {resolved.bench.name}",
                   rd.path / "curves.png")
    rd.write_summary(summary)   # last: a summary saying "finished" means every file of the run is written
