"""The method contract. The evaluator owns the loop; a method owns learning and prediction.

A method never sees test data and never receives the task identity at test time: ``predict`` gets
images only (plus sample keys for caching frozen features) and returns logits over all seen classes.
"""
from __future__ import annotations

import abc
import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from cilbench.backbones.vit import ViTBackbone
from cilbench.data.base import Batch, SampleView, SinglePass, stream_reused
from cilbench.data.stream import ClassIncrementalData


@dataclass(frozen=True)
class BenchmarkInfo:
    name: str
    n_classes: int
    n_tasks: int
    task_sizes: tuple[int, ...]
    image_size: int


class Reporter:
    """Progress sink; the base class is silent, the CLI provides a rich one."""

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def start_task(self, t: int) -> None:
        pass

    def end_task(self, t: int, line: str) -> None:
        pass

    def epoch(self, epoch: int, epochs: int, loss: float | None = None) -> None:
        pass

    def log(self, message: str) -> None:
        pass


@dataclass
class RunContext:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 1993
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast on CUDA when the method allows it)
    reporter: Reporter = field(default_factory=Reporter)

    def autocast(self, enabled: bool = True):
        if not enabled or self.precision == "fp32" or self.device.type != "cuda":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)


@dataclass(frozen=True)
class OnlineProtocol:
    """Online continual learning: each training sample streamed once, in batches of ``batch_size``
    (0 = the method's), with ``iters`` gradient steps allowed per batch."""
    enabled: bool = False
    batch_size: int = 0
    iters: int = 1


@dataclass
class Task:
    """What ``learn`` gets: the task's classes and a factory for loaders over its training data."""

    index: int
    n_tasks: int
    start: int  # first remapped label of the task (= classes known before it)
    stop: int
    data: ClassIncrementalData = field(repr=False)
    seed: int = 0
    allow_past_data: bool = False
    online: OnlineProtocol = OnlineProtocol()  # enabled: one loader, one pass (see ``train_loader``)
    _streamed: bool = field(default=False, repr=False)
    _streams: Callable[[], int] = field(default_factory=lambda: itertools.count().__next__, repr=False)

    @property
    def classes(self) -> range:
        """The classes this task introduces (labels start..stop-1)."""
        return range(self.start, self.stop)

    @property
    def recurring(self) -> tuple[int, ...]:
        """Earlier labels this task brings new training images of (overlapping protocols; else empty)."""
        return self.data.splits[self.index].recurring

    @property
    def labels(self) -> list[int]:
        """Every label in this task's training data: the recurring ones, then the new range."""
        return [*self.recurring, *self.classes]

    @property
    def known(self) -> int:
        return self.start

    @property
    def total(self) -> int:
        return self.stop

    def train_loader(self, batch_size: int, shuffle: bool = True, augment: bool = True) -> SampleView | SinglePass:
        """The task's training data. Online: the stream (shuffled, each sample once), at most one."""
        if not self.online.enabled:
            return self.data.task_view(self.index, batch_size, shuffle, augment, self._next_seed())
        if self._streamed:
            raise stream_reused(self.index)
        self._streamed = True
        view = self.data.task_view(self.index, self.online.batch_size or batch_size, True, augment, self._next_seed())
        return SinglePass(view, self.index, self.online.iters)

    def seen_train_loader(self, batch_size: int, shuffle: bool = True, augment: bool = True) -> SampleView:
        """All training data of classes seen so far: only for reference upper bounds (``joint``)."""
        if not self.allow_past_data:
            raise PermissionError("only methods with uses_past_data=True may read past tasks' data")
        return self.data.seen_view(self.index, batch_size, shuffle, augment, self._next_seed())

    def _next_seed(self) -> int:
        return (self.seed * 100_003 + self.index) * 101 + self._streams()


@dataclass(frozen=True)
class ParamCost:
    total: int       # parameters of everything the method holds (backbone included)
    trainable: int   # parameters that received gradient updates in the last task
    added: int       # parameters beyond the backbone's (adapters, prompts, heads, ...)
    stored: int      # non-parameter numbers kept for prediction/training (prototypes, statistics)


class Method(abc.ABC):
    name: ClassVar[str] = ""
    label: ClassVar[str] = ""               # how tables name it when not just ``name`` (re-implementations)
    Config: ClassVar[type]
    online: ClassVar[bool] = False          # runs the online protocol unless run.online says otherwise
    uses_past_data: ClassVar[bool] = False  # reference upper bounds only
    # Scaled-down hyper-parameters applied on synthetic benchmarks (CPU-sized), below every
    # benchmark/user/CLI setting; each method documents its own.
    synthetic_defaults: ClassVar[dict[str, Any]] = {}
    # Boolean Config fields that depart from the suite's protocol (e.g. PILOT's test-batch prompt vote):
    # field -> the tag every table shows beside a run that sets it.
    flagged_settings: ClassVar[dict[str, str]] = {}
    # Config fields added after runs were stored, with the value that reproduces those runs (so old
    # runs are still told apart from new ones in `compare`).
    added_settings: ClassVar[dict[str, Any]] = {}
    takes_gradient_steps: ClassVar[bool] = True   # False: run.online_iters has nothing to act on
    mixed_precision: ClassVar[bool] = True        # autocast in training and prediction under run.precision

    @classmethod
    def table_tags(cls, settings: dict[str, Any]) -> list[str]:
        """The tags of ``flagged_settings`` that ``settings`` (a Config as a dict) turns on."""
        return [tag for key, tag in cls.flagged_settings.items() if settings.get(key)]

    @classmethod
    def online_passes(cls, cfg: Any) -> int:
        """How many times ``learn`` would read a task's training stream under the online protocol
        (which allows one); by default the method's ``epochs``."""
        return int(getattr(cfg, "epochs", 1))

    @classmethod
    def protocol_errors(cls, cfg: Any, online: OnlineProtocol, precision: str) -> list[tuple[str, str]]:
        """(cause, remedy) for each protocol setting this method cannot honour with ``cfg``: it is
        refused before the run starts instead of being silently ignored."""
        errors = []
        if online.enabled and cls.online_passes(cfg) != 1:
            errors.append((f"{cls.name} reads each task's data {cls.online_passes(cfg)} times, but the online "
                           "protocol (--online / run.online) streams it once",
                           "run it offline (--no-online), or lower its epochs (method.epochs, method.tuned_epoch, "
                           "...) so that it reads the data once"))
        if online.enabled and online.iters > 1 and not cls.takes_gradient_steps:
            errors.append((f"{cls.name} takes no gradient steps, so run.online_iters={online.iters} would do nothing",
                           "drop run.online_iters"))
        if precision != "fp32" and not cls.mixed_precision:
            errors.append((f"{cls.name} does not run under mixed precision, so run.precision={precision} would "
                           "do nothing", "use run.precision=fp32"))
        return errors

    def __init__(self, cfg: Any, ctx: RunContext):
        self.cfg, self.ctx = cfg, ctx
        self.backbone: ViTBackbone | None = None
        self._backbone_params = 0

    def setup(self, backbone: ViTBackbone, info: BenchmarkInfo) -> None:
        self.backbone = backbone.to(self.ctx.device)
        self.info = info
        self._backbone_params = count_params(backbone)

    @abc.abstractmethod
    def learn(self, task: Task) -> None: ...

    @abc.abstractmethod
    def predict(self, batch: Batch) -> torch.Tensor:
        """Logits (B, n_seen) over all classes seen so far."""

    def wants_eval(self, task_index: int, n_tasks: int) -> bool:
        """False skips evaluation after this task (the evaluator always evaluates the last task)."""
        return True

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def modules(self) -> list[nn.Module]:
        """Everything holding parameters; the default is the backbone only."""
        return [self.backbone] if self.backbone is not None else []

    def stored_tensors(self) -> list[torch.Tensor]:
        return []

    def cost(self) -> ParamCost:
        params = {id(p): p for m in self.modules() for p in m.parameters()}
        total = sum(p.numel() for p in params.values())
        trainable = sum(p.numel() for p in params.values() if p.requires_grad)
        stored = sum(t.numel() for t in self.stored_tensors())
        return ParamCost(total, trainable, total - self._backbone_params, stored)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
