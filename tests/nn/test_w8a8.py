"""QLinearW8A8: its logical tensors, and the msModelSlim file tensors its codec writes, reproduce the layer output by
the documented arithmetic; the codec's encoding is undone exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from slimquant.formats import msmodelslim as ms
from slimquant.formats.checkpoint import layer_type
from slimquant.math.qparams import qparams_from_minmax
from slimquant.math.weights import quantize_weight
from slimquant.nn.w8a8 import QLinearW8A8
from slimquant.types import QTYPES, Granularity, QuantSpec

W_PC = QuantSpec("int8", Granularity.PER_CHANNEL)
W_PT = QuantSpec("int8", Granularity.PER_TENSOR)
STATIC = QuantSpec("int8", Granularity.PER_TENSOR, symmetric=False)
DYNAMIC = QuantSpec("int8", Granularity.PER_TOKEN, dynamic=True)


def _layer(k: int = 48, n: int = 24, bias: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    return lin.to(dtype)


def _static(lin: nn.Linear, spec: QuantSpec = W_PC, lo: float = -2.5, hi: float = 3.0) -> QLinearW8A8:
    qw = quantize_weight(lin.weight.detach().float(), spec)
    scale, zp = qparams_from_minmax(torch.tensor(lo), torch.tensor(hi), QTYPES["int8"], False)
    return QLinearW8A8.from_float(lin, qw.q, qw.scale.reshape(-1), spec, STATIC, float(scale), float(zp))


def _documented_static_output(q: QLinearW8A8, x: torch.Tensor) -> torch.Tensor:
    """docs/format.md's W8A8 arithmetic, in float64 from the msModelSlim file tensors only."""
    f = ms.encode_layer(q)
    s = f["input_scale"].double()
    o = f["input_offset"].double()
    xq = torch.clamp(torch.round(x.double() / s) + o, -128, 127)
    acc = xq @ f["weight"].double().T + f["quant_bias"].double()
    deq = f["deq_scale"]
    deq = (deq.to(torch.int32).view(torch.float32) if deq.dtype == torch.int64 else deq).double()
    return acc * deq


def _logical_output(q: QLinearW8A8, x: torch.Tensor) -> torch.Tensor:
    """The module doc's arithmetic on the logical tensors, in float64."""
    s, zp = q.input_scale.double(), q.input_zero_point.double()
    xq = torch.clamp(torch.round(x.double() / s) + zp, -128, 127)
    return ((xq - zp) @ q.weight.double().T + q.acc_bias.double()) * q.acc_scale.double()


@pytest.mark.parametrize("spec", [W_PC, W_PT], ids=["per-channel", "per-tensor"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_static_forward_is_the_documented_arithmetic(spec: QuantSpec, bias: bool, impl: str) -> None:
    q = _static(_layer(bias=bias), spec)
    q.kernel = impl
    x = torch.randn(3, 5, 48) * 1.2
    y = q(x)
    assert y.shape == (3, 5, 24) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _documented_static_output(q, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), _logical_output(q, x), rtol=1e-5, atol=1e-5)


def test_static_logical_tensors_and_their_file_layout_follow_the_seed_table() -> None:
    q = _static(_layer())
    assert {k: (tuple(v.shape), v.dtype) for k, v in q.state_dict().items()} == {
        "weight": ((24, 48), torch.int8),
        "input_scale": ((1,), torch.float32),
        "input_zero_point": ((1,), torch.float32),
        "acc_scale": ((24,), torch.float32),
        "acc_bias": ((24,), torch.int32),
    }
    assert {k: (tuple(v.shape), v.dtype) for k, v in ms.encode_layer(q).items()} == {
        "weight": ((24, 48), torch.int8),
        "input_scale": ((1,), torch.float32),
        "input_offset": ((1,), torch.float32),
        "quant_bias": ((24,), torch.int32),
        "deq_scale": ((24,), torch.float32),
    }
    assert layer_type(q.manifest_entry()) == "W8A8"


@pytest.mark.parametrize(("dtype", "io", "deq"), [(torch.float16, torch.float16, torch.int64),
                                                  (torch.bfloat16, torch.bfloat16, torch.float32)])  # fmt: skip
def test_half_models_store_input_params_in_their_dtype_and_deq_scale_as_the_seed_says(dtype, io, deq) -> None:
    lin = _layer(dtype=dtype)
    q = _static(lin)
    f = ms.encode_layer(q)
    assert f["input_scale"].dtype == io and f["input_offset"].dtype == io and f["deq_scale"].dtype == deq
    assert q.input_scale.dtype == io and q.acc_scale.dtype == torch.float32
    # the float32 value behind the stored deq_scale is input_scale (as stored) * weight scale
    w_scale = quantize_weight(lin.weight.detach().float(), W_PC).scale.reshape(-1)
    torch.testing.assert_close(q.acc_scale, q.input_scale.float() * w_scale, rtol=1e-6, atol=0)
    x = (torch.randn(4, 48) * 1.2).to(dtype)
    assert q(x).dtype == dtype
    torch.testing.assert_close(q(x).double(), _documented_static_output(q, x.float()).to(dtype).double(),
                               rtol=1e-2, atol=1e-2)  # fmt: skip


def test_static_output_is_close_to_float() -> None:
    lin = _layer()
    x = torch.rand(64, 48) * 5.0 - 2.5
    q = _static(lin, lo=float(x.min()), hi=float(x.max()))
    ref = lin(x).detach()
    err = (q(x) - ref).pow(2).mean() / ref.pow(2).mean()
    assert err < 1e-4  # observed 2.8e-5


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_dynamic_forward(impl: str) -> None:
    lin = _layer()
    qw = quantize_weight(lin.weight.detach(), W_PC)
    q = QLinearW8A8.from_float(lin, qw.q, qw.scale.reshape(-1), W_PC, DYNAMIC)
    q.kernel = impl
    assert {k: (tuple(v.shape), v.dtype) for k, v in q.state_dict().items()} == {
        "weight": ((24, 48), torch.int8),
        "weight_scale": ((24, 1), torch.float32),
        "bias": ((24,), torch.float32),
    }
    f = ms.encode_layer(q)  # msModelSlim also stores zero weight offsets
    assert {k: (tuple(v.shape), v.dtype) for k, v in f.items()} == {
        "bias": ((24,), torch.float32),
        "weight": ((24, 48), torch.int8),
        "weight_scale": ((24, 1), torch.float32),
        "weight_offset": ((24, 1), torch.float32),
    }
    assert not f["weight_offset"].any()
    assert layer_type(q.manifest_entry()) == "W8A8_DYNAMIC"
    x = torch.randn(2, 7, 48) * torch.logspace(-2, 1, 7)[None, :, None]  # very different token scales
    s = x.abs().amax(-1, keepdim=True) / 127
    expected = (torch.round(x / s) @ q.weight.float().T) * s * q.weight_scale[:, 0] + lin.bias
    torch.testing.assert_close(q(x), expected.detach(), rtol=1e-5, atol=1e-6)
    ref = lin(x).detach()
    assert float(((q(x) - ref).norm(dim=-1) / ref.norm(dim=-1)).max()) < 0.02  # observed 0.0089


def test_fast_and_reference_kernels_agree_on_a_model_sized_layer() -> None:
    lin = _layer(576, 192, seed=3)
    q = _static(lin, lo=-4.0, hi=6.0)
    x = torch.randn(1, 33, 576) * 2
    q.kernel = "reference"
    ref = q(x)
    q.kernel = "fast"
    torch.testing.assert_close(q(x), ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dynamic", [False, True])
def test_manifest_round_trip_builds_the_same_empty_layer(dynamic: bool) -> None:
    lin = _layer()
    qw = quantize_weight(lin.weight.detach(), W_PC)
    q = (QLinearW8A8.from_float(lin, qw.q, qw.scale.reshape(-1), W_PC, DYNAMIC) if dynamic else _static(lin))
    empty = QLinearW8A8.from_manifest(q.manifest_entry())
    assert {k: (v.shape, v.dtype, v.device.type) for k, v in empty.state_dict().items()} == {
        k: (v.shape, v.dtype, "meta") for k, v in q.state_dict().items()
    }
    empty.load_state_dict(q.state_dict(), assign=True)
    x = torch.randn(3, 48)
    assert torch.equal(empty(x), q(x))


def test_deq_scale_int64_holds_the_float32_bits() -> None:
    v = torch.tensor([1e-4, 3.5e-3, 0.25], dtype=torch.float32)
    bits = ms.deq_scale_to_int64(v)
    assert bits.dtype == torch.int64 and bool((bits >= 0).all()) and bool((bits < 2**32).all())
    assert torch.equal(ms.deq_scale_from_int64(bits), v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["static", "static-nobias", "dynamic"])
def test_the_msmodelslim_encoding_is_undone_exactly(kind: str, dtype: torch.dtype) -> None:
    lin = _layer(bias=kind != "static-nobias", dtype=dtype)
    qw = quantize_weight(lin.weight.detach().float(), W_PC)
    q = (QLinearW8A8.from_float(lin, qw.q, qw.scale.reshape(-1), W_PC, DYNAMIC) if kind == "dynamic"
         else _static(lin, lo=-3.0, hi=1.7))  # fmt: skip
    empty = QLinearW8A8.from_manifest(q.manifest_entry())
    back = ms.decode_layer(Path("x"), "layer", empty, ms.encode_layer(q))
    assert set(back) == set(q.state_dict())
    for k, v in q.state_dict().items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    empty.load_state_dict(back, assign=True)
    x = (torch.randn(5, 48) * 2).to(dtype)
    assert torch.equal(empty(x), q(x))


def test_quant_bias_follows_in_place_edits_of_the_logical_tensors() -> None:
    q = _static(_layer())
    x = torch.randn(3, 48)
    y = q(x)
    with torch.no_grad():
        q.acc_bias.add_(1000)
    assert not torch.equal(q(x), y)
    torch.testing.assert_close(q(x).double(), _logical_output(q, x), rtol=1e-5, atol=1e-5)
