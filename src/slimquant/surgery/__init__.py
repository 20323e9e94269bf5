"""Module selection and replacement (no math here)."""

from slimquant.surgery.select import Selection, get_module, last_linear_name, select, set_module

__all__ = ["Selection", "select", "last_linear_name", "get_module", "set_module"]
