"""Exceptions raised by slimquant. Every user-facing failure is a :class:`SlimquantError`."""

from __future__ import annotations


class SlimquantError(Exception):
    """A failure caused by the input (a file, a flag, a layer): the message names the culprit."""


class NotSupportedYet(SlimquantError):
    """A documented option whose implementation has not landed yet."""
