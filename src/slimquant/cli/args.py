"""Argument types shared by the subcommands (defined with the recipe flags, in :mod:`slimquant.types.flags`)."""

from __future__ import annotations

from slimquant.types.flags import positive_float, positive_int, str2bool

__all__ = ["positive_float", "positive_int", "str2bool"]
