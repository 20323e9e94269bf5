"""Per-architecture descriptions (data only; the transforms live in algorithms/ and pipeline/).

A :class:`SmoothGroup` names, relative to one block, the op whose output feeds a set of linear
layers and nothing else, so scaling that output per channel by ``1/s`` and the linears' input
columns by ``s`` leaves the block's function unchanged. The op is a norm (its weight, and bias,
are divided) or a linear layer (its output rows are divided).

Groups are listed only where that holds exactly: post-norm models (BERT) feed their norms into the
residual stream too, so only their value -> attention-output pair qualifies; Llama-style ``v_proj ->
o_proj`` is left out because grouped-query attention repeats each value channel across heads.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from slimquant.errors import SlimquantError


@dataclass(frozen=True)
class SmoothGroup:
    prev: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class GatedMLP:
    """``path(x) = down(act(gate(x)) * up(x))`` (names relative to one block, then to the MLP)."""

    path: str
    gate: str
    up: str
    down: str
    act: str = "act_fn"


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    blocks: str  # dotted path of the ModuleList of repeated blocks (a prefix such as "bert." is allowed)
    smooth: tuple[SmoothGroup, ...]
    # norm classes that compute ``weight * (x * rsqrt(mean(x^2) + eps))`` in float32 with a ``variance_epsilon``
    # attribute and no other state: a smooth group's norm of such a class may be fused with its readers'
    # int8 input quantization (slimquant.nn.fused)
    rms_norms: tuple[str, ...] = ()
    gated_mlp: GatedMLP | None = None
    tensor_parallel: "TensorParallel | None" = None


@dataclass(frozen=True)
class TensorParallel:
    """How a tensor-parallel runtime shards one block's linears (names relative to the block): ``column`` layers
    split their output channels (weight rows), ``row`` layers their input channels (weight columns; their
    outputs are summed across parts). ``heads``: the config keys of head counts each part must divide."""

    column: tuple[str, ...]
    row: tuple[str, ...]
    heads: tuple[str, ...] = ("num_attention_heads", "num_key_value_heads")


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        "llama",
        ("llama", "mistral", "qwen2", "qwen3"),
        "model.layers",
        (
            SmoothGroup("input_layernorm", _ATTN),
            SmoothGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
            SmoothGroup("mlp.up_proj", ("mlp.down_proj",)),  # down's input is act(gate) * up
        ),
        rms_norms=("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"),
        gated_mlp=GatedMLP("mlp", "gate_proj", "up_proj", "down_proj"),
        tensor_parallel=TensorParallel((*_ATTN, "mlp.gate_proj", "mlp.up_proj"), ("self_attn.o_proj", "mlp.down_proj")),
    ),
    Architecture(
        "opt",
        ("opt",),
        "model.decoder.layers",
        (
            SmoothGroup("self_attn_layer_norm", _ATTN),
            SmoothGroup("final_layer_norm", ("fc1",)),
            SmoothGroup("self_attn.v_proj", ("self_attn.out_proj",)),  # full multi-head attention
        ),
        tensor_parallel=TensorParallel((*_ATTN, "fc1"), ("self_attn.out_proj", "fc2"), ("num_attention_heads",)),
    ),
    Architecture(
        "gpt2",
        ("gpt2",),
        "transformer.h",
        (SmoothGroup("ln_1", ("attn.c_attn",)), SmoothGroup("ln_2", ("mlp.c_fc",))),
    ),
    Architecture(
        "bert",
        ("bert",),
        "encoder.layer",
        (SmoothGroup("attention.self.value", ("attention.output.dense",)),),
        tensor_parallel=TensorParallel(("attention.self.query", "attention.self.key", "attention.self.value",
                                        "intermediate.dense"), ("attention.output.dense", "output.dense"),
                                       ("num_attention_heads",)),  # fmt: skip
    ),
)


def architecture_for(model: nn.Module) -> Architecture:
    """The description of ``model``'s architecture, by its config's ``model_type``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        return architecture_of_type(None, f"{type(model).__name__} (no Hugging Face config)")
    return architecture_of_type(model_type)


def architecture_of_type(model_type: str | None, what: str | None = None) -> Architecture:
    """The description of the architecture a config's ``model_type`` names (``what``: how errors name it)."""
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    known = sorted(t for a in ARCHITECTURES for t in a.model_types)
    what = what or f"model_type {model_type!r}"
    raise SlimquantError(f"no architecture description for {what}; known: {', '.join(known)}")


def _blocks_path(model: nn.Module, arch: Architecture) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    for n in names:
        if n == arch.blocks or n.endswith("." + arch.blocks):
            return n
    raise SlimquantError(f"{type(model).__name__}: no block list {arch.blocks!r} as the {arch.name} description expects")


def smooth_groups(model: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    """Every ``(prev, linears)`` group of the model with full module names, checked to exist."""
    arch = architecture_for(model)
    path = _blocks_path(model, arch)
    blocks = model.get_submodule(path)
    out = []
    for i in range(len(blocks)):
        for g in arch.smooth:
            prev = f"{path}.{i}.{g.prev}"
            linears = tuple(f"{path}.{i}.{name}" for name in g.linears)
            for name in (prev, *linears):
                try:
                    model.get_submodule(name)
                except AttributeError:
                    raise SlimquantError(f"{arch.name} description: module {name} does not exist in this model") from None
            out.append((prev, linears))
    return out


def block_names(model: nn.Module, arch: Architecture) -> list[str]:
    """Full names of the model's blocks under ``arch``'s block list."""
    path = _blocks_path(model, arch)
    return [f"{path}.{i}" for i in range(len(model.get_submodule(path)))]


def gated_mlps(model: nn.Module) -> list[tuple[str, "GatedMLP"]]:
    """``(full name, layout)`` of every gated MLP of ``model`` (one per block), from its architecture description;
    an architecture without one is an error naming it."""
    arch = architecture_for(model)
    if arch.gated_mlp is None:
        raise SlimquantError(f"the {arch.name} description has no gated MLP (gate / up / down linears)")
    return [(f"{b}.{arch.gated_mlp.path}", arch.gated_mlp) for b in block_names(model, arch)]


def is_causal_lm(model: nn.Module) -> bool:
    """A transformers-style causal LM (``generate``, ``config.use_cache``, not encoder-decoder): it is called with
    ``use_cache=False`` on calibration items (else each block would get a KV cache that grows item after item),
    and its latency is a prefill plus decode steps."""
    cfg = getattr(model, "config", None)
    return (callable(getattr(model, "generate", None)) and hasattr(cfg, "use_cache")
            and not getattr(cfg, "is_encoder_decoder", False))  # fmt: skip


def block_list(model: nn.Module) -> str:
    """Dotted name of the ``nn.ModuleList`` of the model's repeated blocks: from the architecture
    description when there is one, else the longest ModuleList whose children all share one class."""
    try:
        return _blocks_path(model, architecture_for(model))
    except SlimquantError:
        pass
    best, size = "", 1
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > size and len({type(c) for c in m}) == 1:
            best, size = name, len(m)
    if not best:
        raise SlimquantError(f"{type(model).__name__}: no list of repeated blocks found (an nn.ModuleList of "
                             "two or more modules of one class)")  # fmt: skip
    return best
