"""Quantized modules: storage layout, forward == float op on the dequantized weight, tied storage."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimquant.nn.modules as modules_mod
from slimquant.kernels import weight_layout
from slimquant.math import dequantize_weight, quantize_weight, sqnr_db
from slimquant.nn import (QMODULES, QConv2d, QConv2dInputQuant, QEmbedding, QLinear, QLinearFP8, QLinearInputQuant,
                          QLinearW8A8, tied_linear)
from slimquant.types import Granularity, QuantSpec

PT, PC, PG = Granularity.PER_TENSOR, Granularity.PER_CHANNEL, Granularity.PER_GROUP

LINEAR_SPECS = [
    QuantSpec("int8", PC),
    QuantSpec("int8", PT, symmetric=False),
    QuantSpec("int4", PG, 32),
    QuantSpec("uint4", PG, 32, symmetric=False, zero_point="float"),
    QuantSpec("int3", PG, 32, symmetric=False),
    QuantSpec("int5", PG, 32),
    QuantSpec("int6", PC, symmetric=False),
    QuantSpec("int2", PC),
    QuantSpec("fp8_e4m3", PC),
]


def _qlinear(spec: QuantSpec, bias: bool = True, seed: int = 0) -> tuple[nn.Linear, QLinear, torch.Tensor]:
    torch.manual_seed(seed)
    lin = nn.Linear(64, 24, bias=bias)
    qw = quantize_weight(lin.weight.detach(), spec)
    return lin, QLinear.from_float(lin, qw, spec), dequantize_weight(qw, spec)


# -- QLinear --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", LINEAR_SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("bias", [True, False])
def test_qlinear_forward_is_f_linear_on_the_dequantized_weight(spec: QuantSpec, bias: bool) -> None:
    lin, q, w_deq = _qlinear(spec, bias)
    assert torch.equal(q.dequantized_weight(), w_deq)
    x = torch.randn(3, 5, 64)
    q.kernel = "torch"
    y = q(x)
    assert torch.equal(y, F.linear(x, w_deq, lin.bias))
    q.kernel = "fast"  # the native GEMV for int8 weights (15 rows): same up to float32 summation order
    torch.testing.assert_close(q(x), y, rtol=1e-5, atol=1e-5 * float(y.abs().max()))
    # and it approximates the float layer (error-bounded tier)
    assert torch.allclose(y, lin(x), atol=1.0)
    assert not torch.equal(y, lin(x))


@pytest.mark.parametrize("spec", LINEAR_SPECS + [QuantSpec("int8", PC, symmetric=False, zero_point="float"),
                                                 QuantSpec("int8", PT)], ids=lambda s: s.describe())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_qlinear_torch_and_reference_kernels_give_the_same_bits(spec: QuantSpec, dtype: torch.dtype) -> None:
    _, q, _ = _qlinear(spec)
    q = q.to(dtype)
    x = torch.randn(2, 7, 64, dtype=dtype)
    q.kernel = "reference"
    ref = q(x)
    q.kernel = "torch"
    assert torch.equal(q(x), ref)
    q.kernel = "nope"
    with pytest.raises(Exception, match="unknown QLinear kernel 'nope'"):
        q(x)


def test_qlinear_int8_is_close_to_float() -> None:
    lin, q, _ = _qlinear(QuantSpec("int8", PC))
    x = torch.randn(16, 64)
    assert sqnr_db(lin(x).detach(), q(x)) > 40  # observed 48.4 dB


@pytest.mark.parametrize("spec", LINEAR_SPECS, ids=lambda s: s.describe())
def test_qlinear_buffers_follow_the_logical_layout(spec: QuantSpec) -> None:
    _, q, _ = _qlinear(spec)
    layout = weight_layout(24, 64, spec)
    sd = q.state_dict()
    assert set(sd) == set(layout) | {"bias"}
    for name, (shape, dtype) in layout.items():
        assert tuple(sd[name].shape) == shape and sd[name].dtype == dtype
    assert not q.bias.requires_grad
    expected = sum(sd[n].numel() * sd[n].element_size() for n in sd)
    assert q.stored_bytes() == expected


def test_qlinear_int4_g32_stored_bytes_by_hand() -> None:
    _, q, _ = _qlinear(QuantSpec("int4", PG, 32))
    # weight 24 x 32 uint8 + scale 24 x 2 float32 (symmetric: no zero point) + bias 24 float32
    assert q.stored_bytes() == 24 * 32 + 24 * 2 * 4 + 24 * 4
    _, qa, _ = _qlinear(QuantSpec("int4", PG, 32, symmetric=False))
    assert qa.stored_bytes() == 24 * 32 + 2 * 24 * 2 * 4 + 24 * 4  # plus the zero points


def test_qlinear_state_dict_reloads_into_an_empty_module() -> None:
    spec = QuantSpec("int4", PG, 32, symmetric=False)
    _, q, _ = _qlinear(spec)
    fresh = QLinear(64, 24, spec)
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(4, 64)
    assert torch.equal(fresh(x), q(x))


def test_qlinear_keeps_the_float_dtype_and_computes_in_the_input_dtype() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(32, 8, bias=False).bfloat16()
    spec = QuantSpec("int8", PC)
    qw = quantize_weight(lin.weight.detach(), spec)
    q = QLinear.from_float(lin, qw, spec)
    assert q.compute_dtype == torch.bfloat16
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    assert torch.equal(q(x), F.linear(x, dequantize_weight(qw, spec, torch.bfloat16)))
    assert q.dequantized_weight().dtype == torch.bfloat16


def test_extra_repr_and_registry() -> None:
    _, q, _ = _qlinear(QuantSpec("int4", PG, 32))
    assert repr(q) == "QLinear(64, 24, spec=int4 g32 sym, bias=True)"
    assert QMODULES == {"QLinear": QLinear, "QConv2d": QConv2d, "QEmbedding": QEmbedding, "QLinearW8A8": QLinearW8A8,
                        "QLinearFP8": QLinearFP8, "QLinearInputQuant": QLinearInputQuant,
                        "QConv2dInputQuant": QConv2dInputQuant}  # fmt: skip


# -- QConv2d --------------------------------------------------------------------------------------

CONV_CASES = [
    dict(in_channels=4, out_channels=6, kernel_size=3),
    dict(in_channels=4, out_channels=8, kernel_size=(3, 2), stride=2, padding=(1, 2), groups=2),
    dict(in_channels=6, out_channels=6, kernel_size=3, padding=2, dilation=2, groups=6, bias=False),
    dict(in_channels=4, out_channels=4, kernel_size=(3, 5), padding=(1, 2), padding_mode="reflect"),
    dict(in_channels=4, out_channels=8, kernel_size=3, stride=(2, 1), padding=1, padding_mode="reflect", groups=4),
    dict(in_channels=2, out_channels=4, kernel_size=3, padding=1, padding_mode="circular"),
    dict(in_channels=2, out_channels=4, kernel_size=3, padding=1, padding_mode="replicate"),
    dict(in_channels=4, out_channels=4, kernel_size=(4, 3), padding="same", padding_mode="reflect"),
    dict(in_channels=4, out_channels=4, kernel_size=(2, 3), padding="same", dilation=(2, 1)),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding="valid", padding_mode="reflect"),
]


@pytest.mark.parametrize("kwargs", CONV_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("spec", [QuantSpec("int8", PC), QuantSpec("int4", PC, symmetric=False)], ids=lambda s: s.describe())
def test_qconv2d_forward_is_conv2d_on_the_dequantized_weight(kwargs: dict, spec: QuantSpec) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(**kwargs)
    w2d = conv.weight.detach().reshape(conv.out_channels, -1)
    qw = quantize_weight(w2d, spec)
    q = QConv2d.from_float(conv, qw, spec)
    assert q.weight_cols == w2d.shape[1]
    ref = copy.deepcopy(conv)  # the float conv (padding_mode, 'same' ...) on the dequantized weight
    with torch.no_grad():
        ref.weight.copy_(dequantize_weight(qw, spec).reshape_as(conv.weight))
    x = torch.randn(2, conv.in_channels, 9, 10)
    y = q(x)
    assert torch.equal(y, ref(x))
    if conv.padding_mode == "zeros":
        assert torch.equal(y, F.conv2d(x, ref.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups))


def test_qconv2d_conv_args_round_trip_through_the_constructor() -> None:
    conv = nn.Conv2d(4, 8, (3, 2), stride=2, padding=(1, 0), groups=2, padding_mode="reflect")
    spec = QuantSpec("int8", PC)
    q = QConv2d.from_float(conv, quantize_weight(conv.weight.detach().reshape(8, -1), spec), spec)
    args = q.manifest_args()
    assert args == {
        "in_channels": 4, "out_channels": 8, "kernel_size": [3, 2], "stride": [2, 2], "padding": [1, 0],
        "dilation": [1, 1], "groups": 2, "padding_mode": "reflect",
    }  # fmt: skip
    fresh = QConv2d(spec=spec, bias=True, **{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(1, 4, 7, 7)
    assert torch.equal(fresh(x), q(x))


# -- QEmbedding -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [QuantSpec("int8", PC), QuantSpec("int4", PG, 16, symmetric=False), QuantSpec("int3", PC), QuantSpec("fp8_e5m2", PC)],
    ids=lambda s: s.describe(),
)
def test_qembedding_forward_is_f_embedding_on_the_dequantized_weight(spec: QuantSpec) -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(50, 32, padding_idx=0)
    qw = quantize_weight(emb.weight.detach(), spec)
    q = QEmbedding.from_float(emb, qw, spec)
    assert q.padding_idx == 0 and q.bias is None
    ids = torch.tensor([[0, 3, 49, 3], [7, 7, 1, 48]])
    w_deq = dequantize_weight(qw, spec)
    y = q(ids)
    assert y.shape == (2, 4, 32)
    assert torch.equal(y, F.embedding(ids, w_deq))
    assert torch.equal(y, q.dequantized_weight()[ids])


def test_qembedding_only_dequantizes_the_looked_up_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(1000, 16)
    spec = QuantSpec("int4", PC)
    q = QEmbedding.from_float(emb, quantize_weight(emb.weight.detach(), spec), spec)
    seen: list[int] = []
    real = modules_mod.dequantize_weight_tensors

    def spy(weight: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(weight.shape[0])
        return real(weight, *args, **kwargs)

    monkeypatch.setattr(modules_mod, "dequantize_weight_tensors", spy)
    ids = torch.tensor([[5, 999, 5]])
    y = q(ids)
    assert seen == [3]  # three rows, not 1000
    monkeypatch.undo()
    assert torch.equal(y, q.dequantized_weight()[ids])


def test_qembedding_repr() -> None:
    spec = QuantSpec("int8", PC)
    assert repr(QEmbedding(10, 4, spec)) == "QEmbedding(10, 4, spec=int8 per-channel sym)"


# -- tied output layer ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", [QuantSpec("int4", PG, 16, symmetric=False), QuantSpec("fp8_e4m3", PC)], ids=lambda s: s.describe()
)
def test_tied_linear_shares_the_embedding_storage(spec: QuantSpec) -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(40, 32)
    qemb = QEmbedding.from_float(emb, quantize_weight(emb.weight.detach(), spec), spec)
    lin = tied_linear(qemb)
    assert isinstance(lin, QLinear) and lin.bias is None
    assert (lin.in_features, lin.out_features) == (32, 40)
    for name in ("weight", "weight_scale", "weight_zero_point"):
        a, b = getattr(qemb, name), getattr(lin, name)
        if a is None:
            assert b is None
        else:
            assert b is a and b.data_ptr() == a.data_ptr()
    x = torch.randn(3, 32)
    torch.testing.assert_close(lin(x), F.linear(x, qemb.dequantized_weight()))  # the default kernel (native int4)
    lin.kernel = "reference"
    assert torch.equal(lin(x), F.linear(x, qemb.dequantized_weight()))
    # a later in-place change to the embedding storage shows through the tied layer
    with torch.no_grad():
        qemb.weight_scale.mul_(2)
    assert torch.equal(lin.dequantized_weight(), qemb.dequantized_weight())


def test_qconv2d_accepts_int_arguments_like_nn_conv2d() -> None:
    from slimquant.math.weights import quantize_weight
    from slimquant.nn import QConv2d
    from slimquant.types import QuantSpec

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, stride=1, padding=1, padding_mode="reflect")
    spec = QuantSpec("int8", "per_channel")
    qw = quantize_weight(conv.weight.detach().reshape(4, -1), spec)
    q = QConv2d(3, 4, 3, spec, stride=1, padding=1, padding_mode="reflect")
    q._set_weight(qw)
    q.bias = torch.nn.Parameter(conv.bias.detach().clone())
    x = torch.randn(1, 3, 8, 8)
    ref = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, [1, 1, 1, 1], mode="reflect"), q.dequantized_weight().reshape(4, 3, 3, 3), conv.bias
    )
    assert q.kernel_size == (3, 3) and q.padding == (1, 1)
    assert torch.equal(q(x), ref)
