"""The YAML task files of ``slimquant tune`` (and the AutoML search): the seed's ``general`` and ``register``
sections, read with their keys and meanings, and the user's registered functions imported from their files.

``general``: ``backend`` (pytorch; mindspore refused), ``parallel_search`` (trials run one at a time: only
false), ``device_evaluate_before_train`` (the float model is always evaluated first: the tolerance is relative
to it), ``task.local_base_path`` / ``task.task_id`` (outputs in ``<local_base_path>/<task_id>/``),
``logger.level``, ``worker.timeout`` (seconds one trial may take).

``register``: ``pkg_path`` (directories added to the import path) and ``modules``: entries with ``module`` (an
importable module name, or a ``.py`` file) and the names of its functions: ``script_network`` (returns the
model), ``script_network_input`` (returns its example inputs), ``ori_correct_func`` (calibration: runs the model
on calibration data; the inputs it feeds the model become slimquant's calibration items), ``ori_eval_func``
(returns the accuracy metric of a model). A ``config`` / ``file_config`` block of the task is passed to the
function as keyword arguments when it accepts them.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimquant.errors import NotSupportedYet, SlimquantError

log = logging.getLogger(__name__)

GENERAL_KEYS = ("backend", "parallel_search", "device_evaluate_before_train", "task", "logger", "worker")
TASK_KEYS = ("local_base_path", "task_id")
REGISTER_KEYS = ("pkg_path", "modules")
MODULE_KEYS = ("module", "script_network", "script_network_input", "ori_correct_func", "ori_eval_func")
FUNCTION_BLOCK_KEYS = ("type", "config", "file_config", "metric_name")
LOG_LEVELS = ("debug", "info", "warning", "error")


def check_keys(d: Any, valid: tuple[str, ...], where: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """``d`` as a dict whose keys are all ``valid`` (an unknown one fails, listing the valid ones)."""
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise SlimquantError(f"{where} must be a mapping, got {type(d).__name__}")
    unknown = [k for k in d if k not in valid]
    if unknown:
        raise SlimquantError(f"unknown key {where}.{unknown[0]}; valid: {', '.join(valid)}")
    missing = [k for k in required if k not in d]
    if missing:
        raise SlimquantError(f"{where}.{missing[0]} is required")
    return dict(d)


@dataclass(frozen=True)
class General:
    output: Path
    log_level: str = "info"
    timeout: float | None = None


def read_general(d: Any, base: Path) -> General:
    g = check_keys(d, GENERAL_KEYS, "general")
    backend = str(g.get("backend", "pytorch")).lower()
    if backend == "mindspore":
        raise NotSupportedYet("general.backend mindspore is not supported; slimquant runs PyTorch models (pytorch)")
    if backend != "pytorch":
        raise SlimquantError(f"general.backend {g['backend']!r}: valid: pytorch")
    if g.get("parallel_search", False) not in (False, None):
        raise NotSupportedYet("general.parallel_search true is not supported yet: trials run one at a time")
    if not isinstance(g.get("device_evaluate_before_train", False), bool):
        raise SlimquantError("general.device_evaluate_before_train must be true or false")
    task = check_keys(g.get("task"), TASK_KEYS, "general.task", required=("task_id",))
    task_id = str(task["task_id"])
    if not task_id or "/" in task_id or task_id in (".", ".."):
        raise SlimquantError(f"general.task.task_id {task_id!r} must be a plain directory name")
    root = Path(str(task.get("local_base_path", "./tasks/")))
    root = root if root.is_absolute() else base / root
    logger = check_keys(g.get("logger"), ("level",), "general.logger")
    level = str(logger.get("level", "info")).lower()
    if level not in LOG_LEVELS:
        raise SlimquantError(f"general.logger.level {logger['level']!r}; valid: {', '.join(LOG_LEVELS)}")
    worker = check_keys(g.get("worker"), ("timeout",), "general.worker")
    timeout = worker.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise SlimquantError(f"general.worker.timeout must be a positive number of seconds, got {timeout!r}")
    return General(root / task_id, level, None if timeout is None else float(timeout))


@dataclass
class Registered:
    """The user's functions, by role (None where not registered)."""

    network: Callable[..., Any]
    inputs: list[Callable[..., Any]] = field(default_factory=list)
    correct: Callable[..., Any] | None = None
    evaluate: Callable[..., Any] | None = None
    where: dict[str, str] = field(default_factory=dict)  # role -> "module.function" for messages


def _import(module: str, base: Path, key: str) -> Any:
    if module.endswith(".py"):
        path = Path(module) if Path(module).is_absolute() else base / module
        if not path.is_file():
            raise SlimquantError(f"{key}: no such file {path}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(path.stem, mod)
        spec.loader.exec_module(mod)
        return mod
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SlimquantError(f"{key}: cannot import module {module!r} ({e}); is register.pkg_path right?") from None


def read_register(d: Any, base: Path) -> Registered:
    r = check_keys(d, REGISTER_KEYS, "register", required=("modules",))
    paths = r.get("pkg_path") or []
    if isinstance(paths, str):
        paths = [paths]
    for p in paths:
        path = Path(str(p)) if Path(str(p)).is_absolute() else base / str(p)
        if not path.is_dir():
            raise SlimquantError(f"register.pkg_path: {path} is not a directory")
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    mods = r["modules"]
    if not isinstance(mods, list) or not mods:
        raise SlimquantError("register.modules must be a non-empty list of module entries")
    found: dict[str, list[Callable[..., Any]]] = {}
    where: dict[str, str] = {}
    for i, entry in enumerate(mods):
        e = check_keys(entry, MODULE_KEYS, f"register.modules[{i}]", required=("module",))
        mod = _import(str(e["module"]), base, f"register.modules[{i}].module")
        for role in MODULE_KEYS[1:]:
            names = e.get(role)
            if names is None:
                continue
            for name in [names] if isinstance(names, str) else list(names):
                fn = getattr(mod, str(name), None)
                key = f"register.modules[{i}].{role}"
                if not callable(fn):
                    raise SlimquantError(f"{key}: module {e['module']!r} has no function {name!r}")
                found.setdefault(role, []).append(fn)
                where.setdefault(role, f"{e['module']}.{name}")
    if "script_network" not in found:
        raise SlimquantError("register.modules: no script_network (the function returning the model) is registered")
    if "ori_eval_func" not in found:
        raise SlimquantError("register.modules: no ori_eval_func (the function returning the model's accuracy) is "
                             "registered")  # fmt: skip
    for role in ("script_network", "ori_correct_func", "ori_eval_func"):
        if len(found.get(role, [])) > 1:
            raise SlimquantError(f"register.modules: {role} is registered {len(found[role])} times; give one")
    return Registered(found["script_network"][0], found.get("script_network_input", []),
                      (found.get("ori_correct_func") or [None])[0], found["ori_eval_func"][0], where)  # fmt: skip


def function_block(d: Any, where: str, registered: str | None = None) -> dict[str, Any]:
    """A ``{type, config, file_config, metric_name}`` block; returns the keyword arguments for the function.
    ``type``, when given, must name the registered function (``registered``: its ``module.function``)."""
    b = check_keys(d, FUNCTION_BLOCK_KEYS, where)
    if "type" in b and (registered is None or str(b["type"]) != registered.rsplit(".", 1)[-1]):
        raise SlimquantError(f"{where}.type {b['type']!r} is not the registered function "
                             f"({registered or 'none is registered for it'})")  # fmt: skip
    return {k: b[k] for k in ("config", "file_config") if k in b}


def call(fn: Callable[..., Any], role: str, where: str, *args: Any, **kwargs: Any) -> Any:
    """Call a registered function with the keyword arguments it accepts; its errors name the function."""
    try:
        params = inspect.signature(fn).parameters
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kwargs = kwargs if takes_all else {k: v for k, v in kwargs.items() if k in params}
    except (TypeError, ValueError):
        pass
    try:
        return fn(*args, **kwargs)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        raise SlimquantError(f"{role} {where} raised {type(e).__name__}: {e}") from e


def captured_inputs(model: nn.Module, correct: Callable[[nn.Module], Any], where: str, **kwargs: Any) -> list[Any]:
    """Run the user's calibration function on ``model`` and return what it fed the model's forward, call by call
    (dicts of keyword arguments, or tuples), detached: slimquant's calibration items."""
    items: list[Any] = []

    def hook(_m: nn.Module, args: tuple, kw: dict) -> None:
        det = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
        if kw:
            if args:
                raise SlimquantError(f"ori_correct_func {where}: calls that mix positional and keyword model inputs "
                                     "cannot be replayed; pass them one way")  # fmt: skip
            items.append({k: det(v) for k, v in kw.items()})
        else:
            items.append(tuple(det(a) for a in args))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            call(correct, "ori_correct_func", where, model, **kwargs)
    finally:
        handle.remove()
    if not items:
        raise SlimquantError(f"ori_correct_func {where} never ran the model: no calibration inputs were seen")
    return items
