"""The Backend interface: everything mixc asks of a framework, in one place.

A backend lowers a :class:`~mixc.compiler.plan.Plan` to a framework model and
runs it. The commands (``compile``, ``train``, ``eval``, ``interpolate``,
``sweep``, ``verify``) and the training driver (``mixc.training``) talk to it
only through this interface, with numpy arrays named by the plan at the
boundary, so they never import a framework and never compare backend names.

A backend is an object (usually a subclass of :class:`Backend`) registered in
the ``mixc.backends`` entry-point group (``backends/__init__.py``). Importing
the object must not import its framework: ``mixc check``/``inspect``/``--help``
list backends without loading torch or jax. Methods import it on first use;
:meth:`Backend.require` checks it is importable and names the pip extra if not.

Three narrow protocols cross the boundary:

- :class:`Trainer`: what the shared training loop drives (step, predict, state
  and optimiser arrays, checkpoint write);
- :class:`Runner`: a built model that holds plan arrays and predicts member
  probabilities, for ``eval`` and ``interpolate``;
- ``Predictor``: numpy inputs ``[N, ...]`` -> member probabilities ``[N, M, classes]``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from mixc.compiler.plan import Plan
from mixc.core.errors import BackendError, BackendUnavailable
from mixc.core.layout_choice import LayoutChoice
from mixc.spec.recipe import Recipe

__all__ = [
    "Backend",
    "Capabilities",
    "Trainer",
    "Runner",
    "Predictor",
    "GraphRunner",
    "COMMANDS",
    "lazy_attributes",
]

#: member probabilities ``[N, M, classes]`` (float32) for model inputs ``[N, ...]``
Predictor = Callable[[np.ndarray], np.ndarray]

#: an exported graph run on numpy inputs: (member probabilities ``[N, M, classes]``, ensemble mean
#: ``[N, classes]``)
GraphRunner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

#: the commands a backend can serve; :attr:`Capabilities.commands` names its subset
COMMANDS = frozenset({"compile", "build", "train", "eval", "interpolate", "sweep", "verify"})


def lazy_attributes(package: str, table: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for a backend package: ``table`` maps a public name to the
    submodule defining it, imported (with its framework) only when the name is first asked for."""

    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(importlib.import_module(f"{package}.{table[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


def check_fits_in_memory(plan: Plan, bytes_per_parameter: int = 4) -> None:
    """Refuse, before allocating, a model whose parameters alone exceed this machine's memory (a
    BackendError naming the count), instead of the framework's raw allocation error (packed with
    a huge alpha, say).
    """
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):  # not POSIX: the framework decides
        return
    need = plan.accounting.total_params * bytes_per_parameter
    if need > memory:
        raise BackendError(
            f"{plan.name} has {plan.accounting.total_params:,} parameters ({need / 2**30:,.1f} GiB"
            f" at {bytes_per_parameter} bytes each), more than this machine's {memory / 2**30:,.1f}"
            " GiB of memory; hint: lower the budget, the width or the method's options (mixc"
            " inspect shows the accounting)"
        )


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, for the CLI's help and its refusals (checked before any work
    starts)."""

    layouts: tuple[str, ...] = ("auto",)
    devices: str = "cpu"  # how --device is spelt for it, for help texts
    data_parallel: str = ""  # how it runs data parallel ("" if it does not)
    commands: frozenset[str] = field(default_factory=lambda: COMMANDS)
    export_formats: tuple[
        str, ...
    ] = ()  # graph formats `mixc export` can write through it ("onnx", ...)
    # the ensemble methods it builds (Plan.method.name)
    methods: frozenset[str] = frozenset({"mixture", "naive"})
    # the models `mixc import` reads through it ("torch.nn.Module"; "" if none)
    imports: str = ""


#: the Backend methods that take a plan first; each refuses a plan whose method the backend does not
#: build
PLAN_ENTRIES = (
    "emit_source",
    "write",
    "build",
    "count_params",
    "trainer",
    "runner",
    "load_predictor",
    "load_logit_predictor",
    "export_graph",
)


def _refusing_unbuilt_methods(entry: Callable) -> Callable:
    """``entry`` preceded by :meth:`Backend.check_method` (applied to every PLAN_ENTRIES method,
    overrides included)."""
    if getattr(entry, "_checks_method", False):
        return entry

    @functools.wraps(entry)
    def checked(self: Backend, *args: Any, **kwargs: Any) -> Any:
        self.check_method(args[0] if args else kwargs["plan"])
        return entry(self, *args, **kwargs)

    checked._checks_method = True  # type: ignore[attr-defined]
    return checked


@runtime_checkable
class Trainer(Protocol):
    """One model under training, as the shared driver (``mixc.training``) sees it.

    Built by :meth:`Backend.trainer` with the recipe's seed (the same initial
    weights on every rank). Arrays cross as numpy, named by the plan; optimiser
    state under ``optim.<plan tensor>.<buffer>`` (torch's buffer names), so a
    run folder resumes under either backend.
    """

    rank: int  # this process's data-parallel rank (0 when single-process)
    world: int  # data-parallel workers (processes or devices)
    device_label: str  # for the console line: "cpu", "cuda:0 x2", "cpu x2 (flax)"
    run_options: dict[str, Any]  # recorded in config.json: device, world_size, framework version
    #: the layout trained in (mixc.core.layout_choice): None until begin() chooses it, unless the
    #: driver sets the one a resumed run folder recorded before calling begin()
    layout_choice: LayoutChoice | None

    def begin(self, x_train: np.ndarray, y_train: np.ndarray, batch: int) -> None:
        """Build the model and optimiser (from the recipe's seed) and hold the training set (on the
        device if it pays; steps name samples by index). Called once, inside the run folder's
        lock, before any resume; refuses a global ``batch`` its workers cannot share."""

    def begin_epoch(self, augment_seed: int, dropout_seed: int) -> None:
        """Reseed augmentation and dropout (the driver derives the seeds from seed, epoch, rank) and
        enter train mode."""

    def step(self, idx: np.ndarray, lr: float, step: int) -> Any:
        """One optimiser step on the global batch ``idx`` (indices into the training set; each rank
        takes its shard) at learning rate ``lr``; ``step`` counts from 0 within the epoch.
        Returns the summed member loss as a framework scalar (added up on the device; ``float()``
        works on it)."""

    def fetch_losses(self, losses: list[Any]) -> Callable[[], list[float]]:
        """Start copying some steps' losses to the host; the returned function waits for that copy
        alone (not for the steps queued since) and gives them as floats. The driver reads losses
        only this way, a batch of them at a time, so no step waits for the device."""

    def step_batch(self, x: Any, y: Any, lr: float, step: int) -> Any:
        """One optimiser step on a batch streamed from disk (``Backend.batches``: numpy arrays or
        the backend's own tensors), random-resized-cropped by the loader when that is the
        augmentation; the trainer applies only crop_flip (at 32x32) to it, never its own
        random-resized crop."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Member probabilities ``[N, M, classes]`` in eval mode (train mode is restored)."""

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Every plan tensor (parameters and BatchNorm statistics) as host arrays."""

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace every plan tensor (e.g. from a checkpoint)."""

    def optimizer_arrays(self) -> dict[str, np.ndarray]:
        """The optimiser state as ``optim.*`` arrays."""

    def load_optimizer(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore the optimiser state from ``optim.*`` arrays (missing buffers start at zero)."""

    def save(self, path: Path, epoch: int, metadata: dict[str, Any]) -> None:
        """Write the checkpoint (plan tensors and optimiser state), refusing non-finite tensors."""

    def close(self) -> None:
        """Release process groups and devices; called once, whatever happened."""


@runtime_checkable
class Runner(Protocol):
    """A built model that holds plan arrays and predicts, for ``eval`` and ``interpolate``."""

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Set plan tensors (any subset) from host arrays."""

    def member_probs(self, x: np.ndarray, bn: Literal["eval", "train"] = "eval") -> np.ndarray:
        """Member probabilities ``[N, M, classes]``; ``bn="train"`` normalises each batch with its
        own statistics."""

    # Optional: ``member_logits(x) -> [N, M, classes]`` (BatchNorm in eval mode). A runner that has
    # it lets `mixc eval --ood` report the logit scores (max logit, energy); without it they are
    # left out.

    def composed_weights(self) -> dict[str, np.ndarray]:
        """Every member's composed weight layers: ``"<layer>.weight"/".bias"`` -> ``[M, ...]`` (a
        plain layer's tensor without the member axis). Needed by ``interpolate``."""


class Backend:
    """Base class of a backend object: the framework-free parts, and the methods a backend must
    supply.

    Subclasses set ``name``, ``extra`` (the pip extra that installs the framework),
    ``modules`` (what must be importable) and ``capabilities``, and implement
    the methods that raise ``NotImplementedError`` here. A backend laid out like
    ``backends/torch/`` (``codegen.emit_source``, ``model.build``/``write``,
    ``checkpoint.save_checkpoint``/``load_checkpoint``) sets ``package`` and
    inherits those methods; any other overrides them.
    """

    name: str = ""
    package: str = ""
    extra: str = ""
    modules: tuple[str, ...] = ()
    capabilities: Capabilities = Capabilities()

    def __repr__(self) -> str:
        return f"<mixc backend {self.name}>"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass's own plan entries check the method too: one check, whichever entry a command
        uses."""
        super().__init_subclass__(**kwargs)
        for name in PLAN_ENTRIES:
            if name in cls.__dict__:
                setattr(cls, name, _refusing_unbuilt_methods(cls.__dict__[name]))

    def check_method(self, plan: Plan) -> None:
        """Refuse, with one clear error, a plan whose ensemble method this backend does not
        build."""
        method = plan.method.name
        if method not in self.capabilities.methods:
            built = ", ".join(sorted(self.capabilities.methods))
            raise BackendError(
                f"method '{method}' is not built by the {self.name} backend yet (it builds:"
                f" {built}); hint: inspect or compile the plan without a backend (`mixc inspect`,"
                " `mixc compile --emit plan`), or choose a method it builds with --set method=..."
            )

    # -- availability ---------------------------------------------------------

    def require(self, command: str | None = None) -> Backend:
        """``self`` if its framework imports (and it serves ``command``), else a clear error with
        the fix."""
        for mod in self.modules:
            try:
                importlib.import_module(mod)
            except ImportError as e:
                raise BackendUnavailable(
                    f"the {self.name} backend needs {mod}, which is not importable here ({e}); "
                    f"hint: pip install 'mixc[{self.extra or self.name}]'"
                ) from None
        if command is not None and command not in self.capabilities.commands:
            served = ", ".join(sorted(self.capabilities.commands))
            raise BackendError(
                f"the {self.name} backend cannot {command} (it serves: {served}); "
                "hint: choose another --backend"
            )
        return self

    # -- code and models (by default from the conventional modules: codegen.py, model.py,
    # checkpoint.py) --

    def _module(self, name: str) -> Any:
        """``<package>.<name>``, imported on first use (so importing the backend object imports no
        framework)."""
        return importlib.import_module(f"{self.package}.{name}")

    def emit_source(self, plan: Plan, standalone: bool = False) -> str:
        """The plan's model as one Python file (what ``mixc compile --backend`` writes); it imports
        the backend's layer classes, or with ``standalone`` holds them (a file that needs the
        framework alone).
        """
        return self._module("codegen").emit_source(plan, standalone=standalone)

    def write(self, plan: Plan, out_dir: str | os.PathLike, standalone: bool = False) -> Path:
        """Write ``plan.json`` and the model source into ``out_dir``; return the source's path."""
        return self._module("model").write(plan, out_dir, standalone=standalone)

    def build(self, plan: Plan, **options: Any) -> Any:
        """The framework model, initialised (options: layout, device, seed... as the backend
        documents)."""
        return self._module("model").build(plan, **options)

    def build_options(self) -> frozenset[str]:
        """The keyword options :meth:`build` takes (``mixc.build`` treats every other keyword as a
        spec override)."""
        return frozenset(inspect.signature(self._module("model").build).parameters) - {"plan"}

    def count_params(self, plan: Plan) -> int:
        """Trainable parameters of the model :meth:`build` makes, without allocating them."""
        raise NotImplementedError

    # -- checkpoints -----------------------------------------------------------

    def save_checkpoint(
        self,
        path: str | os.PathLike,
        model: Any,
        plan: Plan,
        epoch: int,
        extra: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Path:
        """Write ``model``'s plan tensors (+ ``extra``) in mixc's checkpoint format, atomically."""
        return self._module("checkpoint").save_checkpoint(path, model, plan, epoch, extra, metadata)

    def load_checkpoint(
        self, path: str | os.PathLike, model: Any, plan: Plan
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Load a checkpoint into ``model``; returns (epoch, extra tensors, metadata)."""
        return self._module("checkpoint").load_checkpoint(path, model, plan)

    # -- running ---------------------------------------------------------------

    def batches(
        self,
        split: Any,
        input_shape: list[int],
        *,
        train: bool,
        batch: int,
        seed: int,
        epoch: int,
        workers: int,
        random_crop: bool | None = None,
    ) -> Any:
        """Batches ``(x, y)`` of an image-folder split (``mixc.core.imagefolder.FolderSplit``) for a
        streamed run: shuffled by ``default_rng([seed, epoch])``, the last partial batch dropped
        and, with ``random_crop`` (None: ``mixc.core.data.default_augment``'s rule), each image
        random-resized-cropped and flipped when ``train``. By default decoded in this process
        with numpy (``mixc.core.imagefolder.iter_batches``); torch uses a DataLoader with
        ``workers`` processes and pinned memory."""
        from mixc.core.imagefolder import iter_batches

        return iter_batches(
            split,
            input_shape,
            train=train,
            batch=batch,
            seed=seed,
            epoch=epoch,
            random_crop=random_crop,
        )

    def set_threads(self, n: int) -> dict[str, Any]:
        """Run the framework's CPU work on ``n`` threads (``mixc.core.threads`` picks ``n``);
        returns what was set, for config.json. By default ``<package>.threads.set_threads``; a
        backend without one sets nothing.
        """
        try:
            module = self._module("threads")
        except ModuleNotFoundError as e:
            if e.name != f"{self.package}.threads":
                raise
            return {"threads": n, "applied": False}
        return module.set_threads(n)

    def trainer(
        self,
        plan: Plan,
        recipe: Recipe,
        *,
        device: str,
        layout: str,
        augment: str,
        compile: bool = False,
    ) -> Trainer:
        """A :class:`Trainer` for the shared driver, initialised from ``recipe.seed``; ``compile``
        asks for the framework's graph compiler (torch.compile) where the backend has one, and is
        refused where not.
        """
        raise NotImplementedError

    def runner(
        self, plan: Plan, *, device: str = "cpu", batch_size: int = 500, layout: str = "auto"
    ) -> Runner:
        """A :class:`Runner`: the plan's model on ``device``, evaluated ``batch_size`` inputs at a
        time."""
        raise NotImplementedError

    def load_predictor(
        self, plan: Plan, checkpoint: str | os.PathLike, device: str = "cpu", batch_size: int = 500
    ) -> Predictor:
        """Member probabilities of ``checkpoint``'s model: a runner loaded from the verified
        checkpoint."""
        from mixc.core.checkpoint_format import read_plan_arrays

        # verified before the (slower) model build
        arrays, _, _ = read_plan_arrays(checkpoint, plan)
        runner = self.runner(plan, device=device, batch_size=batch_size)
        runner.load_arrays(arrays)
        return lambda x: runner.member_probs(np.asarray(x, dtype=np.float32))

    def load_logit_predictor(
        self, plan: Plan, checkpoint: str | os.PathLike, device: str = "cpu", batch_size: int = 500
    ) -> Predictor | None:
        """Member logits ``[N, M, classes]`` of ``checkpoint``'s model, or None when the runner
        gives probabilities only (no ``member_logits``): `mixc eval --ood` then leaves the logit
        scores out, saying so.
        """
        from mixc.core.checkpoint_format import read_plan_arrays

        try:
            runner = self.runner(plan, device=device, batch_size=batch_size)
        except NotImplementedError:  # a backend that only overrides load_predictor
            return None
        if not hasattr(runner, "member_logits"):
            return None
        arrays, _, _ = read_plan_arrays(checkpoint, plan)
        runner.load_arrays(arrays)
        return lambda x: runner.member_logits(np.asarray(x, dtype=np.float32))

    # -- deployment (``mixc export``) -------------------------------------------

    def export_graph(
        self, plan: Plan, composed: list[Any], fmt: str, path: Path
    ) -> tuple[str, int | None]:
        """Write the ensemble with ``composed`` member weights (``mixc.export.compose_all``) folded
        in as constants, as ``fmt`` (one of ``capabilities.export_formats``) to ``path``; returns
        (exporter, opset).
        """
        raise NotImplementedError

    def graph_runner(self, fmt: str, path: Path) -> GraphRunner:
        """Run an exported graph the way a deployment would (onnxruntime for ONNX, say)."""
        raise NotImplementedError

    # -- `mixc import` (when ``capabilities.imports`` names a model type) ---------------------

    def describe_module(self, module: Any, input_shape: list[int]) -> Any:
        """``module`` (a model of this framework) traced into a neutral
        :class:`mixc.core.module_graph.ModuleGraph` for inputs of one sample's ``input_shape``."""
        raise NotImplementedError

    def check_import(
        self, module: Any, plan: Plan, name_map: dict[str, str], input_shape: list[int]
    ) -> Any:
        """Build ``plan`` (one plain member), copy ``module``'s weights in through ``name_map``
        (state name -> plan tensor) and compare logits (an ``ImportCheck``, mixc.core.module_graph).
        """
        raise NotImplementedError

    def imported_arrays(
        self, module: Any, name_map: dict[str, str], plan: Plan
    ) -> dict[str, np.ndarray]:
        """``module``'s weights as numpy arrays under ``plan``'s tensor names and shapes."""
        raise NotImplementedError


for (
    _name
) in PLAN_ENTRIES:  # the base class's own entries (subclasses get theirs in __init_subclass__)
    setattr(Backend, _name, _refusing_unbuilt_methods(getattr(Backend, _name)))
