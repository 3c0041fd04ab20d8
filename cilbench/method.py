"""The method contract. The evaluator owns the loop; a method owns learning and prediction.

A method never sees test data and never receives the task identity at test time: ``predict`` gets
images only (plus sample keys for caching frozen features) and returns logits over all seen classes.
"""
from __future__ import annotations

import abc
import contextlib
import copy
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from cilbench.backbones.vit import ViTBackbone
from cilbench.data.base import Batch, SampleView, SinglePass, stream_reused
from cilbench.data.stream import TrainingData


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
    """What ``learn`` gets: the task's classes and a factory for loaders over its training data
    (``data`` is the stream's training side only: no path leads from a task to a test image)."""

    index: int
    n_tasks: int
    start: int  # first remapped label of the task (= classes known before it)
    stop: int
    data: TrainingData = field(repr=False)
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


def config_epochs(cfg: Any) -> float:
    """Training epochs per task as a method's config names them (``epochs`` or ``tuned_epoch``), else 1."""
    for name in ("epochs", "tuned_epoch"):
        value = getattr(cfg, name, None)
        if value:
            return float(value)
    return 1.0


class Method(abc.ABC):
    name: ClassVar[str] = ""
    label: ClassVar[str] = ""               # how tables name it when not just ``name`` (re-implementations)
    Config: ClassVar[type]
    online: ClassVar[bool] = False          # runs the online protocol unless run.online says otherwise
    uses_past_data: ClassVar[bool] = False  # reference upper bounds only
    # Boolean Config fields that depart from the suite's protocol (e.g. PILOT's test-batch prompt vote):
    # field -> the tag every table shows beside a run that sets it.
    flagged_settings: ClassVar[dict[str, str]] = {}
    # Config fields added after runs were stored, with the value that reproduces those runs (so old
    # runs are still told apart from new ones in `compare`).
    added_settings: ClassVar[dict[str, Any]] = {}
    # Config fields that were removed, with the stored value that means what the current code does
    # (such a run still resumes and groups with new ones).
    removed_settings: ClassVar[dict[str, Any]] = {}
    takes_gradient_steps: ClassVar[bool] = True   # False: run.online_iters has nothing to act on
    caches_test_features: ClassVar[bool] = False  # a test image's features are computed once (cilbench.cost)
    mixed_precision: ClassVar[bool] = True        # autocast in training and prediction under run.precision
    streams_online: ClassVar[bool] = False        # True: under --online, one pass whatever its epochs (rwf, samoe)
    # Plain attributes (ints, lists, optimizers) saved by the default ``state_dict`` beside the
    # discovered modules; an object with ``state_dict``/``load_state_dict`` is saved through them.
    state_attrs: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def training_image_epochs(cls, cfg: Any, images_per_task: list[float]) -> float:
        """For the cost model (``cilbench.cost``): images x epochs trained on over a run, a forward-only
        pass over an image counting 1/3. Default: every task's images for the config's ``epochs`` (or
        ``tuned_epoch``), or one forward pass each for a method without gradient steps."""
        if not cls.takes_gradient_steps:
            return sum(images_per_task) / 3
        return sum(images_per_task) * config_epochs(cfg)

    @classmethod
    def table_tags(cls, settings: dict[str, Any]) -> list[str]:
        """The tags of ``flagged_settings`` that ``settings`` (a Config as a dict) turns on."""
        return [tag for key, tag in cls.flagged_settings.items() if settings.get(key)]

    @classmethod
    def online_passes(cls, cfg: Any) -> int:
        """How many times ``learn`` would read a task's training stream under the online protocol
        (which allows one); by default the method's ``epochs``."""
        return 1 if cls.streams_online else int(getattr(cfg, "epochs", 1))

    @classmethod
    def protocol_errors(cls, cfg: Any, online: OnlineProtocol, precision: str) -> list[tuple[str, str]]:
        """(cause, remedy) for each protocol setting this method cannot honour with ``cfg``: it is
        refused before the run starts instead of being silently ignored."""
        errors = []
        if online.enabled and cls.uses_past_data:
            errors.append((f"{cls.name} trains on every seen task's data at once: it has no online variant",
                           "run it offline (--no-online)"))
        elif online.enabled and cls.online_passes(cfg) != 1:
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

    # ---- discovered structure: cost columns and state derive from it ---------------------------
    def modules(self) -> dict[str, nn.Module]:
        """Every module the method holds, found among its attributes (in the order they were set);
        free ``nn.Parameter`` attributes are gathered in one module named ``params`` (at the place of the
        first of them)."""
        found: dict[str, nn.Module | None] = {}
        free: dict[str, nn.Parameter] = {}
        for name, value in vars(self).items():
            if isinstance(value, nn.Parameter):
                found.setdefault("params", None)   # keeps the place of the first free parameter
                free[name] = value
            elif isinstance(value, nn.Module):
                found[name] = value
        if free:
            found["params"] = _FreeParams(free)
        return found  # type: ignore[return-value]

    def stored_tensors(self) -> list[torch.Tensor]:
        """Non-parameter numbers kept for prediction or training: by default the buffers of every
        module but the backbone (prototypes, statistics)."""
        seen = {id(b) for b in self.backbone.buffers()} if self.backbone is not None else set()
        out = {}
        for m in self.modules().values():
            for b in m.buffers():
                if id(b) not in seen:
                    out[id(b)] = b
        return list(out.values())

    def trained(self) -> list[nn.Parameter]:
        """Every parameter that is not frozen, once, in the order the method created them."""
        params = {id(p): p for m in self.modules().values() for p in m.parameters() if p.requires_grad}
        return list(params.values())

    def cost(self, updated: set[int] = frozenset()) -> ParamCost:
        """Parameter counts; ``updated`` holds the ids of the parameters an optimizer stepped in the
        last task (the evaluator collects them: ``trainable``)."""
        params = {id(p): p for m in self.modules().values() for p in m.parameters()}
        total = sum(p.numel() for p in params.values())
        trainable = sum(p.numel() for k, p in params.items() if k in updated)
        stored = sum(t.numel() for t in self.stored_tensors())
        return ParamCost(total, trainable, total - self._backbone_params, stored)

    def state_dict(self) -> dict[str, Any]:
        """Every discovered module's state (the backbone's only while it trains) and ``state_attrs``."""
        state: dict[str, Any] = {}
        for name, module in self.modules().items():
            if module is self.backbone and not any(p.requires_grad for p in module.parameters()):
                continue
            state[name] = module.state_dict()
        for name in self.state_attrs:
            value = getattr(self, name)
            state[name] = value.state_dict() if hasattr(value, "state_dict") else copy.deepcopy(value)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The inverse of ``state_dict``: parameters and buffers whose stored shape differs (a head or
        pool that grew) are resized before loading."""
        modules = self.modules()
        for name, module_state in state.items():
            if name in self.state_attrs:
                current = getattr(self, name)
                if hasattr(current, "load_state_dict"):
                    current.load_state_dict(module_state)
                else:
                    setattr(self, name, copy.deepcopy(module_state))
            elif name in modules:
                resize_to(modules[name], module_state)
                modules[name].load_state_dict(module_state)
            else:
                raise KeyError(f"{self.name}: the saved state has {name!r}, which this method does not hold")
        if "params" in state:
            for key, p in modules["params"].named_parameters():
                setattr(self, key, p)


class _FreeParams(nn.Module):
    """A method's free parameters as one module (names kept), for counting and state."""

    def __init__(self, params: dict[str, nn.Parameter]):
        super().__init__()
        for key, p in params.items():
            self.register_parameter(key, p)


def resize_to(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give each parameter/buffer of ``module`` the shape it has in ``state`` (growing heads, pools)."""
    for key, value in state.items():
        owner_name, _, leaf = key.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf in owner._parameters and owner._parameters[leaf] is not None:
            current = owner._parameters[leaf]
            if current.shape != value.shape:
                owner._parameters[leaf] = nn.Parameter(current.new_empty(value.shape),
                                                       requires_grad=current.requires_grad)
        elif leaf in owner._buffers and owner._buffers[leaf] is not None:
            current = owner._buffers[leaf]
            if current.shape != value.shape:
                owner._buffers[leaf] = current.new_empty(value.shape)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
