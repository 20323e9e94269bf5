"""Choose modules by name: exact names (a parent name covers its children), globs, ``re:`` regexes."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from torch import nn

from slimquant.errors import SlimquantError


@dataclass(frozen=True)
class Selection:
    """Names that matched and the patterns that matched nothing."""

    matched: frozenset[str]
    unmatched_patterns: tuple[str, ...]


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.startswith(pattern + ".")


def select(names: list[str], patterns: tuple[str, ...] | list[str]) -> Selection:
    """Match ``patterns`` against module ``names``.

    Raises:
        SlimquantError: a ``re:`` pattern that is not a valid regular expression.
    """
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise SlimquantError(f"disable_names: invalid regex {p!r}: {e}") from None
    matched: set[str] = set()
    unmatched: list[str] = []
    for p in patterns:
        hits = {n for n in names if _matches(p, n)}
        if not hits:
            unmatched.append(p)
        matched |= hits
    return Selection(frozenset(matched), tuple(unmatched))


def last_linear_name(model: nn.Module) -> str | None:
    """Name of the model's output projection: HF ``get_output_embeddings()`` or the last nn.Linear."""
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
        if out is not None:
            for name, m in model.named_modules():
                if m is out:
                    return name
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = name
    return last


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
