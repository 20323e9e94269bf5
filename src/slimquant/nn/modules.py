"""Quantized module classes holding integer weights plus their scales and zero points.

Real classes (no patched ``forward``). Their state dict holds logical tensors (see
:mod:`slimquant.kernels.weight_only`): ``weight`` (the grid values; 2/3/4-bit packed), ``weight_scale``,
``weight_zero_point`` (asymmetric specs) and ``bias``; how a checkpoint format lays them out is its codec's
business (:mod:`slimquant.formats`). The forward dequantizes the weight to the input's dtype, then runs the
float op. ``QLinear.kernel`` picks how: ``"reference"`` dequantizes with :func:`dequantize_weight_tensors`;
``"torch"`` dequantizes unpacked integer per-channel / per-tensor weights in place on one float32 copy (the same
float32 operations as the reference, so the same bits); ``"native"`` runs int8 weights (per-channel, per-tensor, or per-group of a
multiple of 16 columns) on float32 inputs through the C++ GEMV of :mod:`slimquant.kernels.native` for up to
``native.W8A16_GEMV_MAX_ROWS`` rows (decode), reading the int8 weight once instead of writing a float copy
(equal to the reference up to float32 summation order), and takes ``"torch"`` otherwise; packed 4-bit weights
(int4 / uint4, any granularity) on float32 inputs go to the native 4-bit kernels for any number of rows (a GEMV
over the nibbles, or a GEMM over float tiles of at most 2 MiB of the weight); ``"fast"`` (the
default) is ``"native"`` when the native library builds, else ``"torch"``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimquant.errors import SlimquantError
from slimquant.kernels import native
from slimquant.kernels.weight_only import dequantize_weight_tensors, unpacked, weight_layout, weight_tensors
from slimquant.math.weights import QuantizedWeight
from slimquant.types.qtype import qtype as lookup_qtype
from slimquant.types.spec import Granularity, QuantSpec


_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


class QModule(nn.Module):
    """Base of every slimquant quantized module.

    Its buffers and parameters are logical tensors (integer values, scales, zero points, bias); a format codec
    (:mod:`slimquant.formats`) maps them to and from its file layout. A subclass records what rebuilds it in
    :meth:`manifest_entry` (JSON: class, spec, constructor arguments) and rebuilds an empty instance on the meta
    device from that entry in :meth:`from_manifest`, whatever the format. ``method``: the record of what
    produced it (the algorithm and its knobs; JSON values), given when it is built (``from_float(...,
    method=)``, :meth:`from_entry`) and kept in the manifest.
    """

    spec: QuantSpec
    compute_dtype: torch.dtype

    def __init__(self) -> None:
        super().__init__()
        self.method: dict[str, Any] = {}

    def manifest_args(self) -> dict[str, Any]:
        """Constructor arguments besides spec/dtype/bias (JSON values)."""
        raise NotImplementedError

    def manifest_entry(self) -> dict[str, Any]:
        return {
            "module": type(self).__name__,
            "spec": self.spec.to_dict(),
            "dtype": str(self.compute_dtype).removeprefix("torch."),
            "bias": self.bias is not None,
            "method": self.method,
            "args": self.manifest_args(),
        }

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> "QModule":
        """An empty (meta) module from :meth:`manifest_entry`'s output; KeyError/TypeError when invalid."""
        raise NotImplementedError

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> "QModule":
        """:meth:`from_manifest` with the entry's method record restored."""
        m = cls.from_manifest(entry)
        method = entry.get("method", {})
        if not isinstance(method, dict):
            raise TypeError(f"method must be a JSON object, got {type(method).__name__}")
        m.method = dict(method)
        return m

    def _refuse_training(self) -> None:
        """A layer :func:`slimquant.convert` made from a fake-quantized one holds frozen integer weights: a training
        forward (training mode, gradients on) is refused instead of training the rest of the model around it."""
        if self.training and torch.is_grad_enabled() and self.method.get("algorithm") == "qat":
            raise SlimquantError(f"{type(self).__name__}({self.extra_repr()}) was converted by slimquant.convert from "
                                 "a fake-quantized layer and cannot be trained further: train the model from "
                                 "prepare_qat before converting, or run this one under model.eval() / torch.no_grad()")  # fmt: skip

    @staticmethod
    def _entry_basics(entry: dict[str, Any]) -> tuple[QuantSpec, torch.dtype, bool, dict[str, Any]]:
        return QuantSpec.from_dict(entry["spec"]), _DTYPES[entry["dtype"]], bool(entry["bias"]), dict(entry["args"])


class _QWeight(QModule):
    """Shared storage of a quantized ``[n, k]`` weight matrix."""

    weight_rows: int
    weight_cols: int

    def _init_storage(
        self, n: int, k: int, spec: QuantSpec, bias: bool, dtype: torch.dtype, device: Any
    ) -> None:
        self.spec = spec
        self.weight_rows, self.weight_cols = n, k
        self.compute_dtype = dtype
        for name, (shape, dt) in weight_layout(n, k, spec).items():
            self.register_buffer(name, torch.empty(shape, dtype=dt, device=device))
        if not hasattr(self, "weight_zero_point"):
            self.weight_zero_point = None
        if bias:
            self.bias = nn.Parameter(torch.empty(n, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def _set_weight(self, qw: QuantizedWeight) -> None:
        for name, t in weight_tensors(qw, self.spec).items():
            getattr(self, name).copy_(t)

    def quantized_weight(self) -> QuantizedWeight:
        """The weight as grid values ``[n, k]`` (unpacked), scales and zero points (None when symmetric)."""
        return QuantizedWeight(unpacked(self.weight, self.spec, self.weight_cols), self.weight_scale, self.weight_zero_point)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float ``[n, k]`` weight this module computes with."""
        return dequantize_weight_tensors(
            self.weight, self.weight_scale, self.weight_zero_point, self.spec, self.weight_cols, dtype or self.compute_dtype
        )

    def stored_bytes(self) -> int:
        """Bytes of the module's tensors (weights, scales, zero points, bias)."""
        return sum(t.numel() * t.element_size() for t in list(self.buffers(recurse=False)) + list(self.parameters(recurse=False)))

    def extra_repr(self) -> str:
        return f"{self.weight_cols}, {self.weight_rows}, spec={self.spec.describe()}, bias={self.bias is not None}"


class QLinear(_QWeight):
    """Weight-quantized ``nn.Linear``: ``y = x @ dequant(W).T + b``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kernel = "fast"
        self._init_storage(out_features, in_features, spec, bias, dtype, device)

    @classmethod
    def from_float(cls, module: nn.Linear, qw: QuantizedWeight, spec: QuantSpec,
                   method: dict[str, Any] | None = None) -> "QLinear":  # fmt: skip
        q = cls(module.in_features, module.out_features, spec, module.bias is not None, module.weight.dtype, module.weight.device)
        q._set_weight(qw)
        if module.bias is not None:
            q.bias.data.copy_(module.bias.detach())
        q.method = dict(method or {})
        return q

    def manifest_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> "QLinear":
        spec, dtype, bias, args = cls._entry_basics(entry)
        return cls(args["in_features"], args["out_features"], spec, bias, dtype, "meta")

    KERNELS = ("fast", "native", "reference", "torch")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._refuse_training()
        if self.kernel == "reference":
            return F.linear(x, self.dequantized_weight(x.dtype), self.bias)
        if self.kernel not in self.KERNELS:
            raise SlimquantError(f"unknown QLinear kernel {self.kernel!r}; valid: {', '.join(self.KERNELS)}")
        if self.kernel == "native" and not native.available():
            raise SlimquantError(f"QLinear kernel 'native': native CPU kernels unavailable: {native.unavailable_reason()}")
        if self.kernel != "torch" and self._native_fits(x) and native.available():
            return self._native_forward(x)
        return F.linear(x, self._fused_dequantized_weight(x.dtype), self.bias)

    def _native_fits(self, x: torch.Tensor) -> bool:
        """CPU float32 input and either a packed 4-bit weight (any number of rows: GEMV or tiled GEMM) or an int8
        weight with at most ``native.W8A16_GEMV_MAX_ROWS`` rows and groups the GEMV takes."""
        # float32 only: for half inputs the module computes in the input's dtype (module doc), the kernels in float32;
        # the native kernels have no backward, so an input that needs a gradient takes dequantize + F.linear
        if x.device.type != "cpu" or x.dtype != torch.float32 or (x.requires_grad and torch.is_grad_enabled()):
            return False
        k, groups = self.weight_cols, self.weight_scale.shape[1]
        if self._packed4:
            return k > 0 and k % groups == 0
        if self.weight.dtype != torch.int8:
            return False
        if k == 0 or x.numel() > native.W8A16_GEMV_MAX_ROWS * k:
            return False
        return groups == 1 or (k % groups == 0 and (k // groups) % 16 == 0)

    @property
    def _packed4(self) -> bool:
        qt = lookup_qtype(self.spec.qtype)
        return qt.packed and qt.bits == 4

    def packed4(self) -> native.Packed4 | None:
        """This layer's weight as the native 4-bit kernels take it, or None when it is not packed 4-bit (or its
        groups do not divide its columns)."""
        k, groups = self.weight_cols, self.weight_scale.shape[1]
        if not self._packed4 or k == 0 or k % groups:
            return None
        qmin = lookup_qtype(self.spec.qtype).qmin
        return native.Packed4(self.weight, self.weight_scale, self.weight_zero_point, qmin, self.bias)

    def _native_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed4:
            p = self.packed4()
            assert p is not None  # _native_fits checked the groups
            return native.w4a16(x, p.w, p.scale, p.zero_point, p.qmin, p.bias, self.weight_cols)
        # the GEMV adds an offset: q + (0 - zp) is q - zp bit for bit (0 - zp: no negative zeros)
        offset = None if self.weight_zero_point is None else 0.0 - self.weight_zero_point
        return native.w8a16(x, self.weight, self.weight_scale, offset, self.bias)

    def _fused_dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`dequantized_weight` bit for bit, with fewer passes over the ``[n, k]`` weight.

        The reference allocates three full-size float32 tensors (``q.float()``, ``- zero_point``, ``* scale``)
        per call, which at one token per call costs several times the matmul. Here the zero point and scale are
        applied in place on ``q.float()``, the same float32 operations in the same order (symmetric specs have
        no zero point). Packed, fp8 and per-group weights take the reference.
        """
        spec, qt = self.spec, lookup_qtype(self.spec.qtype)
        if qt.packed or qt.is_float or spec.granularity is Granularity.PER_GROUP:  # fp8 does not promote
            return self.dequantized_weight(dtype)
        w = self.weight.float()  # the one fresh [n, k] tensor; the rest is in place
        if self.weight_zero_point is not None:
            w.sub_(self.weight_zero_point)
        return w.mul_(self.weight_scale).to(dtype)  # scale [n, 1] or [1, 1]


class QConv2d(_QWeight):
    """Weight-quantized ``nn.Conv2d``; the weight is stored flattened as ``[out, in/groups*kh*kw]``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        spec: QuantSpec,
        stride: tuple[int, int] = (1, 1),
        padding: Any = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        dtype: torch.dtype = torch.float32,
        device: Any = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        pair = torch.nn.modules.utils._pair
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        self.dilation, self.groups, self.padding_mode = pair(dilation), groups, padding_mode
        k = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        self._init_storage(out_channels, k, spec, bias, dtype, device)

    @classmethod
    def from_float(cls, module: nn.Conv2d, qw: QuantizedWeight, spec: QuantSpec,
                   method: dict[str, Any] | None = None) -> "QConv2d":  # fmt: skip
        q = cls(
            module.in_channels, module.out_channels, module.kernel_size, spec, module.stride, module.padding,
            module.dilation, module.groups, module.bias is not None, module.padding_mode,
            module.weight.dtype, module.weight.device,
        )  # fmt: skip
        q._set_weight(qw)
        if module.bias is not None:
            q.bias.data.copy_(module.bias.detach())
        q.method = dict(method or {})
        return q

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> "QConv2d":
        spec, dtype, bias, a = cls._entry_basics(entry)
        padding = a["padding"] if isinstance(a["padding"], str) else tuple(a["padding"])
        return cls(
            a["in_channels"], a["out_channels"], tuple(a["kernel_size"]), spec, tuple(a["stride"]), padding,
            tuple(a["dilation"]), a["groups"], bias, a["padding_mode"], dtype, "meta",
        )  # fmt: skip

    def manifest_args(self) -> dict[str, Any]:
        """Constructor arguments (besides spec/dtype), as recorded in the manifest."""
        return {
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size), "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation), "groups": self.groups, "padding_mode": self.padding_mode,
        }  # fmt: skip

    def _reversed_padding_repeated_twice(self) -> list[int]:
        # F.pad order (last dim first), as nn.Conv2d computes it; string paddings ('same', 'valid')
        # must be turned into numbers here because the conv below runs with padding 0.
        if isinstance(self.padding, str):
            out: list[int] = []
            for d, k in zip(reversed(self.dilation), reversed(self.kernel_size)):
                total = 0 if self.padding == "valid" else d * (k - 1)
                out += [total // 2, total - total // 2]
            return out
        return [p for p in reversed(self.padding) for _ in range(2)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._refuse_training()
        w = self.dequantized_weight(x.dtype).reshape(
            self.out_channels, self.in_channels // self.groups, *self.kernel_size
        )
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice(), mode=self.padding_mode)
            return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class QEmbedding(_QWeight):
    """Weight-quantized ``nn.Embedding`` (per row or per group); only looked-up rows are dequantized."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        spec: QuantSpec,
        padding_idx: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self._init_storage(num_embeddings, embedding_dim, spec, False, dtype, device)

    @classmethod
    def from_float(cls, module: nn.Embedding, qw: QuantizedWeight, spec: QuantSpec,
                   method: dict[str, Any] | None = None) -> "QEmbedding":  # fmt: skip
        q = cls(module.num_embeddings, module.embedding_dim, spec, module.padding_idx, module.weight.dtype, module.weight.device)
        q._set_weight(qw)
        q.method = dict(method or {})
        return q

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, spec={self.spec.describe()}"

    def manifest_args(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "padding_idx": self.padding_idx}

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> "QEmbedding":
        spec, dtype, _, args = cls._entry_basics(entry)
        return cls(args["num_embeddings"], args["embedding_dim"], spec, args["padding_idx"], dtype, "meta")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        zp = self.weight_zero_point
        rows = dequantize_weight_tensors(
            self.weight[flat], self.weight_scale[flat], None if zp is None else zp[flat],
            self.spec, self.embedding_dim, self.compute_dtype,
        )  # fmt: skip
        return rows.reshape(*ids.shape, self.embedding_dim)


def tied_linear(embedding: QEmbedding, bias: bool = False, tied_to: str | None = None) -> QLinear:
    """A QLinear (e.g. a tied lm_head) that shares the embedding's tensors; its method record is the embedding's
    (with ``tied_to``, the embedding's name, when given)."""
    lin = QLinear(
        embedding.embedding_dim, embedding.num_embeddings, embedding.spec, bias, embedding.compute_dtype, device="meta"
    )
    for name in ("weight", "weight_scale", "weight_zero_point"):
        if getattr(embedding, name, None) is not None:
            setattr(lin, name, getattr(embedding, name))
    lin.method = dict(embedding.method, **({} if tied_to is None else {"tied_to": tied_to}))
    return lin
