"""Model knowledge as data: for each architecture, where its repeated blocks are and which op feeds
which linear layers (for equivalence transforms such as SmoothQuant)."""

from slimquant.adapters.architectures import (
    ARCHITECTURES,
    Architecture,
    SmoothGroup,
    architecture_for,
    block_list,
    smooth_groups,
)

__all__ = ["ARCHITECTURES", "Architecture", "SmoothGroup", "architecture_for", "block_list", "smooth_groups"]
