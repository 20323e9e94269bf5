"""Norms and gated MLPs fused with the int8 input quantization of their W8A8 readers, native norms before
weight-only layers, and 4-bit gated MLPs (slimquant.nn.fused, slimquant.surgery.fuse): which modules are swapped, same state dict, the exact float path
whenever the fused one does not apply, outputs within float32 rounding of the unfused model, and save/load."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_llama

import slimquant as sq
from slimquant.nn import QLinearW8A8
from slimquant.kernels import native
from slimquant.nn.fused import FusedGatedMLP, FusedRMSNorm, FusedW4A16GatedMLP, NativeRMSNorm
from slimquant.surgery.fuse import fuse_for_inference
from slimquant.types.spec import LayerOverride, QuantSpec, Recipe

W8 = QuantSpec("int8", "per_channel")
DYNAMIC = QuantSpec("int8", "per_token", dynamic=True)
STATIC = QuantSpec("int8", "per_tensor", symmetric=False)


def _ids(vocab: int, n: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(5))


def _quantized_pair(llama, input_spec: QuantSpec):  # noqa: ANN001
    """(unfused, fused) copies of ``llama`` quantized W8A8 with ``input_spec``."""
    ids = _ids(llama.config.vocab_size, 4)
    fused = sq.quantize(copy.deepcopy(llama), Recipe(weight=W8, input=input_spec), calib_data=ids,
                        show_progress=False).model  # fmt: skip
    unfused = copy.deepcopy(fused)
    for name, module in list(unfused.named_modules()):  # put the original modules back
        if isinstance(module, (FusedRMSNorm, FusedGatedMLP)):
            parent, _, child = name.rpartition(".")
            setattr(unfused.get_submodule(parent), child, module.original)
    for m in unfused.modules():
        if isinstance(m, QLinearW8A8):
            m.rows_from = None
    return unfused, fused


def _logits(model, ids: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    with torch.inference_mode():
        return model(ids).logits


@pytest.mark.parametrize("input_spec", [DYNAMIC, STATIC], ids=["dynamic", "static"])
def test_quantize_fuses_norms_and_mlps_of_w8a8_llama(llama, input_spec: QuantSpec) -> None:  # noqa: ANN001
    unfused, fused = _quantized_pair(llama, input_spec)
    for layer in fused.model.layers:
        assert isinstance(layer.input_layernorm, FusedRMSNorm) and isinstance(layer.post_attention_layernorm, FusedRMSNorm)
        assert isinstance(layer.mlp, FusedGatedMLP)
        assert layer.self_attn.q_proj.rows_from is layer.input_layernorm
        assert layer.input_layernorm.input_key == layer.self_attn.q_proj.input_key()
    assert type(fused.model.norm).__name__ == "LlamaRMSNorm"  # the final norm feeds the float lm_head
    assert list(fused.state_dict()) == list(unfused.state_dict())
    assert fuse_for_inference(fused) == 0  # already fused
    ids = _ids(llama.config.vocab_size)
    a, b = _logits(unfused, ids), _logits(fused, ids)
    # only float32 rounding in the norm and in exp separates them; a value on a rounding edge may land one
    # int8 step away, which moves a logit by far less than the quantization error itself
    assert float((a - b).abs().max()) < 0.05 * float(a.abs().max())
    kl = F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="batchmean")
    assert float(kl) < 1e-3 * ids.shape[1]  # observed ~1e-7


def test_fused_path_reads_the_rows_it_was_handed(llama, native_lib, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    _, fused = _quantized_pair(llama, DYNAMIC)
    calls = {"rows": 0}
    rows = QLinearW8A8.forward_rows

    def count_rows(self, *a):  # noqa: ANN001, ANN202
        calls["rows"] += 1
        return rows(self, *a)

    monkeypatch.setattr(QLinearW8A8, "forward_rows", count_rows)
    _logits(fused, _ids(llama.config.vocab_size))
    # per layer: q, k, v, gate, up read the norms' rows, down the MLP's; o_proj quantizes its own input
    assert calls["rows"] == 6 * len(fused.model.layers)


def test_reference_kernels_take_the_exact_float_path(llama) -> None:  # noqa: ANN001
    """With any reader off the "fast" kernel, the fused modules compute exactly what the originals do."""
    unfused, fused = _quantized_pair(llama, DYNAMIC)
    for model in (unfused, fused):
        for m in model.modules():
            if isinstance(m, QLinearW8A8):
                m.kernel = "reference"
    ids = _ids(llama.config.vocab_size)
    assert torch.equal(_logits(unfused, ids), _logits(fused, ids))


def test_without_native_kernels_the_outputs_are_unchanged(llama, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    from slimquant.kernels import native

    unfused, fused = _quantized_pair(llama, STATIC)
    monkeypatch.setattr(native, "library", lambda: None)
    ids = _ids(llama.config.vocab_size)
    assert torch.equal(_logits(unfused, ids), _logits(fused, ids))


def test_gradients_take_the_float_path(llama) -> None:  # noqa: ANN001
    _, fused = _quantized_pair(llama, DYNAMIC)
    norm = fused.model.layers[0].input_layernorm
    x = torch.randn(1, 5, llama.config.hidden_size, requires_grad=True)
    y = norm(x)
    assert norm._rows is None  # the float path: no rows kept
    y.sum().backward()
    assert x.grad is not None


def test_rows_live_as_long_as_the_norm_output(llama, native_lib) -> None:  # noqa: ANN001
    import weakref

    _, fused = _quantized_pair(llama, DYNAMIC)
    norm = fused.model.layers[0].input_layernorm
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            y = norm(torch.randn(1, 5, llama.config.hidden_size))
            _, _, q, xs, _ = norm._rows
            assert q.shape == (5, llama.config.hidden_size) and xs.shape == (5,)
            ref = weakref.ref(q)
            del q, xs, y
            assert norm._rows is None and ref() is None  # freed with the output
            y = norm(torch.randn(1, 5, llama.config.hidden_size))
            for _ in norm.readers:
                assert norm.rows_for(y) is not None
            assert norm._rows is None  # every reader took them: dropped


def _zero_output(module, args, out):  # noqa: ANN001, ANN202
    out.mul_(0)  # activation ablation, in place


def _zero_input(module, args):  # noqa: ANN001, ANN202
    args[0].mul_(0)


def _zero_hidden_states(module, args, kwargs):  # noqa: ANN001, ANN202
    kwargs["hidden_states"].mul_(0)


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
@pytest.mark.parametrize("hook", ["norm_output_in_place", "norm_output_replaced", "q_proj_input_in_place",
                                  "attention_input_in_place"])  # fmt: skip
def test_hooks_that_edit_the_norm_output_are_seen_by_the_fused_path(llama, native_lib, mode, hook) -> None:  # noqa: ANN001
    """A hook that edits (or replaces) the norm's output: the readers compute on what they get, as unfused."""
    unfused, fused = _quantized_pair(llama, DYNAMIC)
    seen = {}
    for model in (unfused, fused):
        layer = model.model.layers[0]
        if hook == "norm_output_in_place":
            layer.input_layernorm.register_forward_hook(_zero_output)
        elif hook == "norm_output_replaced":
            layer.input_layernorm.register_forward_hook(lambda m, a, out: out * 0.5)
        elif hook == "q_proj_input_in_place":
            layer.self_attn.q_proj.register_forward_pre_hook(_zero_input)
        else:
            layer.self_attn.register_forward_pre_hook(_zero_hidden_states, with_kwargs=True)
        layer.self_attn.q_proj.register_forward_hook(lambda m, a, out, key=id(model): seen.__setitem__(key, out.clone()))
    ids = _ids(llama.config.vocab_size)
    with mode():
        a, b = unfused(ids).logits, fused(ids).logits
    if hook != "norm_output_replaced":  # the input of q_proj is all zeros, and q_proj has no bias
        assert torch.count_nonzero(seen[id(unfused)]) == 0
        assert torch.count_nonzero(seen[id(fused)]) == 0  # before the fix: stale rows, non-zero
    assert float((a - b).abs().max()) < 0.05 * float(a.abs().max())


def test_static_readers_with_different_ranges_keep_their_own_quantization(llama) -> None:  # noqa: ANN001
    unfused, _ = _quantized_pair(llama, STATIC)
    attn = unfused.model.layers[0].self_attn
    attn.k_proj.input_scale.mul_(2)  # k now quantizes the shared input differently from q and v
    # per layer two norms and the MLP, less layer 0's input_layernorm
    assert fuse_for_inference(unfused) == 3 * len(unfused.model.layers) - 1
    assert type(unfused.model.layers[0].input_layernorm).__name__ == "LlamaRMSNorm"
    assert attn.q_proj.rows_from is None


def test_no_fusion_without_w8a8_or_a_known_architecture(llama, bert, mlp) -> None:  # noqa: ANN001
    w8a16 = sq.quantize(copy.deepcopy(llama), Recipe(weight=W8), show_progress=False).model
    assert not any(isinstance(m, (FusedRMSNorm, FusedGatedMLP)) for m in w8a16.modules())
    assert all(isinstance(layer.input_layernorm, NativeRMSNorm) for layer in w8a16.model.layers)  # weight-only
    ids = _ids(bert.config.vocab_size, 4)
    b = sq.quantize(copy.deepcopy(bert), Recipe(weight=W8, input=DYNAMIC), calib_data=ids, show_progress=False).model
    assert fuse_for_inference(b) == 0  # BERT: LayerNorm, post-norm; not fused
    assert fuse_for_inference(mlp) == 0  # no architecture description


def test_save_load_round_trip_of_a_fused_model(llama, tokenizer, tmp_path) -> None:  # noqa: ANN001
    result = sq.quantize(llama, Recipe(weight=W8, input=DYNAMIC), calib_data=_ids(llama.config.vocab_size, 4),
                         show_progress=False)  # fmt: skip
    fused = result.model
    assert isinstance(fused.model.layers[1].mlp, FusedGatedMLP)
    sq.save(result, tmp_path / "q", tokenizer=tokenizer)
    loaded = sq.load(tmp_path / "q").model
    assert isinstance(loaded.model.layers[1].mlp, FusedGatedMLP)
    ids = _ids(llama.config.vocab_size)
    assert torch.equal(_logits(loaded, ids), _logits(fused, ids))


def test_generate_decodes_through_the_fused_path(llama) -> None:  # noqa: ANN001
    unfused, fused = _quantized_pair(llama, DYNAMIC)
    ids = _ids(llama.config.vocab_size, 1, 6)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        a = unfused.generate(ids, **kw)
        b = fused.generate(ids, **kw)
    assert b.shape == (1, 11)
    assert float((a == b).float().mean()) >= 0.9  # greedy tokens of a random tiny model; rounding may flip one


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
def test_other_llama_family_models_fuse(arch: str) -> None:
    import transformers

    cfg_cls, model_cls = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),  # biased q/k/v
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),  # q_norm / k_norm inside attention
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    cfg = cfg_cls(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)  # fmt: skip
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    ids = _ids(64, 4)
    fused = sq.quantize(copy.deepcopy(model), Recipe(weight=W8, input=DYNAMIC), calib_data=ids, show_progress=False).model
    assert sum(isinstance(m, (FusedRMSNorm, FusedGatedMLP)) for m in fused.modules()) == 3 * 2
    reference = copy.deepcopy(fused)
    for m in reference.modules():
        if isinstance(m, QLinearW8A8):
            m.kernel = "torch"  # the unfused float path, same integer arithmetic
    a, b = _logits(reference, _ids(64)), _logits(fused, _ids(64))
    assert float((a - b).abs().max()) < 0.05 * float(a.abs().max())


# -- 4-bit gated MLPs ---------------------------------------------------------------------------------------

W4 = QuantSpec("int4", "per_group", group_size=32)
U4 = QuantSpec("uint4", "per_group", group_size=32, symmetric=False)


def _w4_pair(llama, spec: QuantSpec = W4):  # noqa: ANN001
    """(unfused, fused) copies of ``llama`` quantized to 4-bit weights with ``spec``."""
    fused = sq.quantize(copy.deepcopy(llama), Recipe(weight=spec), show_progress=False).model
    unfused = copy.deepcopy(fused)
    for layer in unfused.model.layers:
        layer.mlp = layer.mlp.original
        layer.input_layernorm = layer.input_layernorm.original
        layer.post_attention_layernorm = layer.post_attention_layernorm.original
    return unfused, fused


def _count_native(monkeypatch: pytest.MonkeyPatch, name: str) -> dict[str, int]:
    """Counts the calls of ``slimquant.kernels.native.<name>``, which still runs: ``{name: calls}``."""
    calls = {name: 0}
    kernel = getattr(native, name)

    def counted(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        calls[name] += 1
        return kernel(*a, **kw)

    monkeypatch.setattr(native, name, counted)
    return calls


@pytest.mark.parametrize("spec", [W4, U4], ids=["int4-sym", "uint4-zp"])
@pytest.mark.parametrize("length", [3, 24], ids=["gemv", "gemm"])
def test_quantize_fuses_4bit_gated_mlps(llama, native_lib, spec: QuantSpec, length: int,
                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    unfused, fused = _w4_pair(llama, spec)
    assert all(isinstance(layer.mlp, FusedW4A16GatedMLP) for layer in fused.model.layers)
    assert not any(isinstance(m, (FusedRMSNorm, FusedGatedMLP)) for m in fused.modules())  # no W8A8 producers
    for layer in fused.model.layers:
        assert isinstance(layer.input_layernorm, NativeRMSNorm)
        assert isinstance(layer.post_attention_layernorm, NativeRMSNorm)
    assert type(fused.model.norm).__name__ == "LlamaRMSNorm"  # the final norm feeds the float lm_head
    assert list(fused.state_dict()) == list(unfused.state_dict())
    assert fuse_for_inference(fused) == 0  # already fused
    calls = _count_native(monkeypatch, "w4a16_gated")
    ids = _ids(llama.config.vocab_size, 2, length)  # 6 rows: the GEMVs; 48: the tiled GEMM
    a, b = _logits(unfused, ids), _logits(fused, ids)
    assert calls["w4a16_gated"] == len(fused.model.layers)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


def test_4bit_mlp_takes_the_unfused_path_when_the_fused_one_does_not_apply(llama, native_lib,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Hooks on gate / up (and global ones) see their calls; other kernels, gradients and other dtypes run the
    original module."""
    unfused, fused = _w4_pair(llama)
    calls = _count_native(monkeypatch, "w4a16_gated")
    ids = _ids(llama.config.vocab_size)
    expected = _logits(unfused, ids)
    mlp = fused.model.layers[0].mlp
    seen = []
    handle = mlp.up_proj.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    torch.testing.assert_close(_logits(fused, ids), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    handle.remove()
    assert seen == [(2, 24, 128)] and calls["w4a16_gated"] == len(fused.model.layers) - 1
    calls["w4a16_gated"] = 0
    with torch.nn.modules.module.register_module_forward_hook(lambda *a: None):
        _logits(fused, ids)
    assert calls["w4a16_gated"] == 0
    acts = []
    handle = mlp.act_fn.register_forward_hook(lambda mod, args, out: acts.append(out.shape))
    _logits(fused, ids)
    handle.remove()
    assert acts == [(2, 24, 128)] and calls["w4a16_gated"] == len(fused.model.layers) - 1  # the hooked MLP ran unfused
    calls["w4a16_gated"] = 0
    mlp.gate_proj.kernel = "reference"
    x = torch.randn(2, 24, 64)
    assert torch.equal(mlp(x), mlp.original(x)) and calls["w4a16_gated"] == 0
    mlp.gate_proj.kernel = "fast"
    xg = x.clone().requires_grad_(True)
    out = mlp(xg)
    out.sum().backward()
    assert calls["w4a16_gated"] == 0 and xg.grad is not None and xg.grad.abs().sum() > 0
    assert mlp(x.double()).dtype == torch.float64 and calls["w4a16_gated"] == 0


def test_save_load_round_trip_of_a_4bit_fused_model(llama, tokenizer, tmp_path) -> None:  # noqa: ANN001
    result = sq.quantize(llama, Recipe(weight=W4), show_progress=False)
    assert isinstance(result.model.model.layers[0].mlp, FusedW4A16GatedMLP)
    sq.save(result, tmp_path / "q", tokenizer=tokenizer)
    loaded = sq.load(tmp_path / "q").model
    assert all(isinstance(layer.mlp, FusedW4A16GatedMLP) for layer in loaded.model.layers)
    ids = _ids(llama.config.vocab_size)
    assert torch.equal(_logits(loaded, ids), _logits(result.model, ids))


def test_no_4bit_fusion_for_other_weights(llama) -> None:  # noqa: ANN001
    """int8 / 3-bit gate and up, or a gate and an up of different kinds, keep the original MLP."""
    for spec in (W8, QuantSpec("int3", "per_group", group_size=32)):
        model = sq.quantize(copy.deepcopy(llama), Recipe(weight=spec), show_progress=False).model
        assert not any(isinstance(m, FusedW4A16GatedMLP) for m in model.modules())
    model = sq.quantize(copy.deepcopy(llama), Recipe(weight=W4, overrides=(("*.up_proj", LayerOverride(weight=W8)),)), show_progress=False).model
    assert not any(isinstance(m, FusedW4A16GatedMLP) for m in model.modules())


# -- native norms before weight-only layers --------------------------------------------------------------


def test_native_norm_equals_the_original_within_float32_rounding(llama, native_lib,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Each block's two norms run natively (counted); the model's logits stay within float32 rounding of the
    model with transformers' norms, and each norm's output within a few ulp of the original's."""
    unfused, fused = _w4_pair(llama)
    calls = _count_native(monkeypatch, "rmsnorm")
    ids = _ids(llama.config.vocab_size)
    a, b = _logits(unfused, ids), _logits(fused, ids)
    assert calls["rmsnorm"] == 2 * len(fused.model.layers)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()))
    norm = fused.model.layers[1].post_attention_layernorm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(3, 7, 64) * 4
    with torch.inference_mode():
        torch.testing.assert_close(norm(x), norm.original(x), rtol=2e-6, atol=1e-6)
    assert "native" in repr(norm)


def test_native_norm_takes_the_original_path_when_it_does_not_apply(llama, native_lib,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Gradients (for the input or the weight), other dtypes, a reader set to the reference kernel and a missing
    native library all run the original module, bit for bit."""
    _, fused = _w4_pair(llama)
    norm = fused.model.layers[0].input_layernorm
    calls = _count_native(monkeypatch, "rmsnorm")
    x = torch.randn(2, 5, 64)
    out = norm(x)  # grad enabled and the weight requires grad: the original, which keeps the graph
    out.sum().backward()
    assert calls["rmsnorm"] == 0 and norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    xg = x.clone().requires_grad_(True)
    with torch.no_grad():
        torch.testing.assert_close(norm(xg), norm.original(xg), rtol=2e-6, atol=1e-6)  # no_grad: native
        assert calls["rmsnorm"] == 1
    assert norm(x.double()).dtype == torch.float64 and calls["rmsnorm"] == 1
    with torch.inference_mode():
        fused.model.layers[0].self_attn.k_proj.kernel = "reference"
        assert torch.equal(norm(x), norm.original(x)) and calls["rmsnorm"] == 1
        fused.model.layers[0].self_attn.k_proj.kernel = "fast"
        norm(x)
        assert calls["rmsnorm"] == 2
        monkeypatch.setattr(native, "library", lambda: None)
        assert torch.equal(norm(x), norm.original(x)) and calls["rmsnorm"] == 2


def test_save_load_keeps_the_native_norms(llama, tokenizer, tmp_path) -> None:  # noqa: ANN001
    result = sq.quantize(llama, Recipe(weight=W4), show_progress=False)
    sq.save(result, tmp_path / "q", tokenizer=tokenizer)
    loaded = sq.load(tmp_path / "q").model
    assert all(isinstance(layer.input_layernorm, NativeRMSNorm) for layer in loaded.model.layers)
    assert list(loaded.state_dict()) == list(result.model.state_dict())
