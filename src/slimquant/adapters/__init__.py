"""Model knowledge as data: for each architecture, where its repeated blocks are and which op feeds
which linear layers (for equivalence transforms such as SmoothQuant)."""

from slimquant.adapters.architectures import (
    ARCHITECTURES,
    Architecture,
    SmoothGroup,
    GatedMLP,
    architecture_for,
    block_list,
    gated_mlps,
    is_causal_lm,
    smooth_groups,
)

__all__ = ["ARCHITECTURES", "Architecture", "GatedMLP", "SmoothGroup", "architecture_for", "block_list", "gated_mlps",
           "is_causal_lm", "smooth_groups"]
