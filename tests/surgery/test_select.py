"""Module selection by name: exact names, globs, re: regexes; the output projection; replacement."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimquant.errors import SlimquantError
from slimquant.surgery import Selection, get_module, last_linear_name, select, set_module

NAMES = [
    "model",
    "model.embed_tokens",
    "model.layers",
    "model.layers.0",
    "model.layers.0.self_attn",
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.o_proj",
    "model.layers.0.mlp",
    "model.layers.0.mlp.gate_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.1",
    "model.layers.1.mlp",
    "model.layers.1.mlp.gate_proj",
    "model.layers.1.mlp.down_proj",
    "model.layers.10",
    "model.layers.10.mlp",
    "model.layers.10.mlp.down_proj",
    "lm_head",
]


def test_exact_name() -> None:
    sel = select(NAMES, ["lm_head"])
    assert sel == Selection(frozenset({"lm_head"}), ())


def test_parent_name_covers_its_children_but_not_prefix_siblings() -> None:
    sel = select(NAMES, ["model.layers.1"])
    assert sel.matched == {
        "model.layers.1",
        "model.layers.1.mlp",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.down_proj",
    }  # not model.layers.10
    assert "model.layers.10" not in sel.matched


def test_globs() -> None:
    assert select(NAMES, ["*.down_proj"]).matched == {
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.10.mlp.down_proj",
    }
    assert select(NAMES, ["model.layers.?.mlp"]).matched == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert select(NAMES, ["model.layers.[01].mlp.gate_proj"]).matched == {
        "model.layers.0.mlp.gate_proj",
        "model.layers.1.mlp.gate_proj",
    }
    assert select(NAMES, ["*_PROJ"]).matched == frozenset()  # case-sensitive


def test_regexes_match_the_whole_name() -> None:
    assert select(NAMES, [r"re:model\.layers\.\d+\.self_attn\.(q|o)_proj"]).matched == {
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.o_proj",
    }
    assert select(NAMES, ["re:mlp"]).unmatched_patterns == ("re:mlp",)  # fullmatch, not search
    assert select(NAMES, [r"re:.*layers\.1\d*\.mlp"]).matched == {"model.layers.1.mlp", "model.layers.10.mlp"}


def test_union_of_patterns_and_unmatched_ones_in_order() -> None:
    sel = select(NAMES, ["lm_head", "nope", "*.q_proj", "re:x+", "model.layers.9"])
    assert sel.matched == {"lm_head", "model.layers.0.self_attn.q_proj"}
    assert sel.unmatched_patterns == ("nope", "re:x+", "model.layers.9")


def test_no_patterns_select_nothing() -> None:
    assert select(NAMES, ()) == Selection(frozenset(), ())


def test_invalid_regex_raises_naming_it() -> None:
    with pytest.raises(SlimquantError, match=r"invalid regex 're:model\.\(layers'"):
        select(NAMES, ["lm_head", "re:model.(layers"])


# -- output projection ----------------------------------------------------------------------------


def test_last_linear_of_a_plain_mlp() -> None:
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), nn.Softmax(-1))
    assert last_linear_name(mlp) == "2.1"
    assert last_linear_name(nn.Sequential(nn.ReLU())) is None


class _WithHead(nn.Module):
    def __init__(self, head_is_output: bool) -> None:
        super().__init__()
        self.head = nn.Linear(4, 4)
        self.tail = nn.Linear(4, 4)  # registered later: the "last Linear"
        self.head_is_output = head_is_output

    def get_output_embeddings(self) -> nn.Module | None:
        return self.head if self.head_is_output else None


class _Raising(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = nn.Linear(2, 2)

    def get_output_embeddings(self) -> nn.Module:
        raise NotImplementedError


def test_get_output_embeddings_wins_over_module_order() -> None:
    assert last_linear_name(_WithHead(True)) == "head"
    assert last_linear_name(_WithHead(False)) == "tail"  # None falls back to the last Linear
    assert last_linear_name(_Raising()) == "b"


@pytest.fixture(scope="module")
def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()  # random init, nothing downloaded


def test_last_linear_name_of_a_tiny_llama_is_lm_head(tiny_llama: nn.Module) -> None:
    assert last_linear_name(tiny_llama) == "lm_head"
    names = [n for n, _ in tiny_llama.named_modules() if n]
    sel = select(names, ["re:model\\.layers\\.\\d+\\.mlp\\.(gate|up)_proj", "model.layers.1.self_attn"])
    assert sel.matched == {
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.self_attn",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.1.self_attn.o_proj",
    }
    assert sel.unmatched_patterns == ()


def test_last_linear_name_without_a_head_falls_back_to_the_last_linear(tiny_llama: nn.Module) -> None:
    assert last_linear_name(tiny_llama.model) == "layers.1.mlp.down_proj"


# -- replacement ----------------------------------------------------------------------------------


def test_get_and_set_module() -> None:
    mlp = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)))
    new = nn.Identity()
    set_module(mlp, "1.0", new)
    assert get_module(mlp, "1.0") is new and mlp[1][0] is new
    top = nn.Linear(4, 4)
    set_module(mlp, "0", top)
    assert mlp[0] is top
    with pytest.raises(AttributeError):
        get_module(mlp, "1.5")
