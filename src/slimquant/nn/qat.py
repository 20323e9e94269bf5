"""Fake-quantized (quantization-aware training) modules: float weights trained through quantize-dequantize.

:class:`FakeQuantizer` fake-quantizes one tensor role of a layer, its weight or its input, to a
:class:`QuantSpec`, with ranges from

* ``"observer"`` (SimQAT, the quantization whitepaper's scheme): weights from their current min / max every step
  (round to nearest on the spec's grid, as post-training RTN); static inputs from an exponential moving average of
  each training batch's min / max (``momentum``), frozen after ``freeze_observers_after`` training steps;
* ``"lsq"``: a learned step size per scale (LSQ, Esser et al. 2020) with its gradient scale
  ``1 / sqrt(numel per scale * qmax)``; asymmetric specs keep the zero point they start from;
* ``"lsq+"``: LSQ plus a learned zero point (LSQ+, Bhalgat et al. 2020), kept on the integer grid (rounded with a
  straight-through gradient) so the converted layer stores it exactly;
* ``"slb"`` (weights only, :class:`SLBWeightQuantizer`): each weight a learned distribution over the grid's levels,
  annealed to its most likely level; the inputs then use observed ranges.

Learned ranges start where the observer would be: weights at their RTN parameters, inputs at the first batch's
min / max (or the calibration data given to :func:`slimquant.prepare_qat`). Dynamic inputs (per token) have no
state. Every fake quantization computes the same float32 operations as the converted module's quantize ->
dequantize (:mod:`slimquant.math.quant`), so :func:`slimquant.convert` keeps the outputs up to float32 rounding.

:class:`QATLinear` / :class:`QATConv2d` hold the original layer's ``weight`` / ``bias`` Parameters (an optimizer
built before :func:`slimquant.prepare_qat` keeps training them, but not the quantizers' new Parameters: LSQ / LSQ+
scales and zero points, SLB's logits; build the optimizer after ``prepare_qat``); :class:`QATConvBn2d` also holds the BatchNorm
that followed the convolution and trains with it folded in (Krishnamoorthi 2018, as Golden Stick's SimQAT): the
weight is scaled by ``gamma / sqrt(running_var + eps)`` before fake quantization; while the BN statistics are
live, the convolution's output is scaled back and the BN normalises it with the batch statistics (updating its
running ones); once frozen (``freeze_bn_after`` steps, or :func:`freeze_bn`) or in eval mode it computes
``conv(x, fq(W_folded)) + b_folded``: what the converted layer computes.

Training steps are counted per module (forward calls in training mode with gradients enabled). Under gradient
checkpointing a recomputed forward counts (and observes) again: count freezing steps accordingly. Weights must be
float32 (half-precision QAT is refused); the quantizers' state lives on the weights' device.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimquant.errors import NotSupportedYet, SlimquantError
from slimquant.math.qparams import grid, qparams_from_minmax
from slimquant.math.quant import dequantize, fake_quantize, learned_fake_quantize, quantize, round_ste
from slimquant.math.weights import QuantizedWeight, check_weight_shape, dequantize_weight, grouped, quantize_weight
from slimquant.types.qtype import qtype as lookup_qtype
from slimquant.types.spec import Granularity, QuantSpec

RANGES = ("observer", "lsq", "lsq+")  # FakeQuantizer's; "slb" weights: SLBWeightQuantizer


class FakeQuantizer(nn.Module):
    """Fake quantization of a layer's weight (``role="weight"``, a ``[n, k]`` matrix: conv weights flattened) or
    input (``role="input"``: static per tensor, or dynamic per token) to ``spec``.

    State: weights under ``"lsq"`` / ``"lsq+"``: ``log_scale`` ``[n, G]`` (Parameter; :attr:`scale` is its exp) and ``zero_point`` (a
    Parameter under ``"lsq+"``, a buffer under ``"lsq"``, absent when symmetric); static inputs: ``rmin`` /
    ``rmax`` (observer) or ``log_scale`` / ``zero_point`` Parameters (learned), ``initialized``, ``observing``
    (False once frozen); ``steps``: training steps seen.
    """

    def __init__(self, spec: QuantSpec, role: str, ranges: str = "observer", momentum: float = 0.9,
                 freeze_after: int | None = None, weight: torch.Tensor | None = None,
                 device: Any = None) -> None:  # fmt: skip
        super().__init__()
        self.where = ""  # " (layer <name>)", set by prepare_qat for error messages
        if ranges not in RANGES:
            raise SlimquantError(f"unknown QAT ranges {ranges!r}; valid: {', '.join(RANGES)}")
        if role not in ("weight", "input"):
            raise SlimquantError(f"FakeQuantizer role must be 'weight' or 'input', not {role!r}")
        qt = lookup_qtype(spec.qtype)
        if qt.is_float:
            raise SlimquantError(f"QAT fake-quantizes integer types; {spec.qtype} is a float type")
        if ranges == "lsq+" and spec.symmetric and not spec.dynamic:
            raise SlimquantError(f"QAT ranges 'lsq+' learn a zero point: the {role} spec must be asymmetric "
                                 f"(symmetric=False), got {spec.describe()}")  # fmt: skip
        if spec.gguf is not None and ranges != "observer":
            raise SlimquantError(f"learned QAT ranges leave the {spec.gguf} grid (GGUF's fp16 block scales); train "
                                 "for a GGUF type with ranges='observer'")  # fmt: skip
        if spec.zero_point == "float" and not spec.symmetric and ranges != "observer":
            raise SlimquantError("learned QAT ranges keep integer zero points; use zero_point='int'")
        self.spec, self.role, self.ranges = spec, role, ranges
        self.momentum = float(momentum)
        self.freeze_after = freeze_after
        self.qmin, self.qmax = grid(qt)
        self.calibrating = False  # set by prepare_qat while its calibration data runs
        self._calib_range: tuple[torch.Tensor, torch.Tensor] | None = None
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("observing", torch.ones((), dtype=torch.bool, device=device))
        if role == "weight":
            if weight is None:
                raise SlimquantError("a weight FakeQuantizer needs the weight it starts from")
            if ranges != "observer":
                qw = quantize_weight(weight.detach().float(), spec)
                self.log_scale = nn.Parameter(torch.log(qw.scale.abs().clamp_min(1e-30)))
                zp = None if qw.zero_point is None else qw.zero_point.clone()
                if ranges == "lsq+":
                    self.zero_point = nn.Parameter(zp)  # type: ignore[arg-type]
                else:
                    self.register_buffer("zero_point", zp)
                per_scale = grouped(weight.detach(), spec).shape[-1]
                self.grad_factor = 1.0 / math.sqrt(per_scale * max(abs(self.qmax), 1.0))
            return
        if spec.dynamic:
            if spec.granularity is not Granularity.PER_TOKEN or not spec.symmetric:
                raise SlimquantError("dynamic inputs are quantized per_token and symmetric")
            return
        if spec.granularity is not Granularity.PER_TENSOR:
            raise SlimquantError(f"static inputs are quantized per_tensor, not {spec.granularity.value}")
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=device))
        if ranges == "observer":
            self.register_buffer("rmin", torch.zeros(1, device=device))
            self.register_buffer("rmax", torch.zeros(1, device=device))
        else:
            self.log_scale = nn.Parameter(torch.zeros(1, device=device))
            if spec.symmetric:
                self.zero_point = None
            elif ranges == "lsq+":
                self.zero_point = nn.Parameter(torch.zeros(1, device=device))
            else:
                self.register_buffer("zero_point", torch.zeros(1, device=device))
            self.grad_factor = 1.0

    @property
    def scale(self) -> torch.Tensor:
        """The learned scales (``exp(log_scale)``: learned in log space so a step can never make one negative;
        the gradient reaching ``log_scale`` is LSQ's step-size gradient times the scale)."""
        return torch.exp(self.log_scale)

    # -- the forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self.steps += 1
            if self.freeze_after is not None and int(self.steps) > self.freeze_after:
                self.observing.fill_(False)
        if self.role == "weight":
            return self._weight(x)
        if self.spec.dynamic:
            return self._dynamic(x)
        return self._static(x)

    def _weight(self, w: torch.Tensor) -> torch.Tensor:
        if self.ranges == "observer":
            qw = quantize_weight(w.detach().float(), self.spec)
            y = dequantize_weight(qw, self.spec, w.dtype)
            return y.detach() + (w - w.detach())  # straight through
        wg = grouped(w, self.spec)
        zp = None if self.zero_point is None else self.zero_point.unsqueeze(-1)
        y = learned_fake_quantize(wg, self.scale.unsqueeze(-1), zp, self.qmin, self.qmax, self.grad_factor)
        return y.reshape(w.shape).to(w.dtype)

    def _dynamic(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.detach().float()
        s, _ = qparams_from_minmax(rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True),
                                   lookup_qtype(self.spec.qtype), True)  # fmt: skip
        return fake_quantize(x, s, None, lookup_qtype(self.spec.qtype))

    def _range_of(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = x.detach().float().amin().reshape(1), x.detach().float().amax().reshape(1)
        if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise SlimquantError(f"QAT{self.where}: the input holds NaN or inf; its quantization range cannot be observed")
        return lo, hi

    def _start_at(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set the range (observer) or the learned scale / zero point to what ``[lo, hi]`` gives."""
        if self.ranges == "observer":
            self.rmin.copy_(lo)
            self.rmax.copy_(hi)
        else:
            s, zp = qparams_from_minmax(lo, hi, lookup_qtype(self.spec.qtype), self.spec.symmetric)
            with torch.no_grad():
                self.log_scale.copy_(torch.log(s))
                if self.zero_point is not None and zp is not None:
                    self.zero_point.copy_(zp)
        self.initialized.fill_(True)

    def observe(self, x: torch.Tensor) -> None:
        """Fold ``x``'s range into the static input's range (observer: its moving average; learned ranges: the
        first batch sets the starting scale / zero point)."""
        lo, hi = self._range_of(x)
        if self.ranges == "observer" and bool(self.initialized):
            self.rmin.mul_(self.momentum).add_(lo, alpha=1.0 - self.momentum)
            self.rmax.mul_(self.momentum).add_(hi, alpha=1.0 - self.momentum)
        elif not bool(self.initialized):
            self._start_at(lo, hi)

    def calibrate(self, x: torch.Tensor) -> None:
        """Widen the static input's range to include ``x`` (min of minima, max of maxima over the calibration
        batches, :func:`slimquant.prepare_qat`'s ``calib_data``) and start the range there."""
        lo, hi = self._range_of(x)
        if self._calib_range is not None:
            lo, hi = torch.minimum(lo, self._calib_range[0]), torch.maximum(hi, self._calib_range[1])
        self._calib_range = (lo, hi)
        self._start_at(lo, hi)

    def _static(self, x: torch.Tensor) -> torch.Tensor:
        learning = self.training and torch.is_grad_enabled()
        if self.calibrating:
            self.calibrate(x)
        elif learning and (not bool(self.initialized) or (self.ranges == "observer" and bool(self.observing))):
            self.observe(x)
        elif not bool(self.initialized):
            raise SlimquantError(f"QAT{self.where}: the input range has not been observed yet: run training steps (or "
                                 "pass calib_data to prepare_qat) before evaluating")  # fmt: skip
        scale, zp = self.input_params()
        if self.ranges == "observer":
            return fake_quantize(x, scale, zp, lookup_qtype(self.spec.qtype))
        y = learned_fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax, self._input_grad_factor(x))
        return y.to(x.dtype)

    def _input_grad_factor(self, x: torch.Tensor) -> float:
        return 1.0 / math.sqrt(max(x.numel(), 1) * max(abs(self.qmax), 1.0))

    # -- what convert stores -----------------------------------------------------------------------------
    def input_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The static input's ``(scale [1], zero_point [1] or None)`` as the converted layer stores them."""
        if self.ranges == "observer":
            return qparams_from_minmax(self.rmin, self.rmax, lookup_qtype(self.spec.qtype), self.spec.symmetric)
        zp = None if self.zero_point is None else torch.round(self.zero_point.detach())
        return self.scale.detach().clone(), zp

    def quantized_weight(self, w: torch.Tensor) -> QuantizedWeight:
        """``w`` ``[n, k]`` on this quantizer's grid: the integers, scales and zero points the converted layer
        stores (the values :meth:`forward` computes)."""
        w = w.detach().float()
        if self.ranges == "observer":
            return quantize_weight(w, self.spec)
        qt = lookup_qtype(self.spec.qtype)
        scale = self.scale.detach().float().clone()
        zp = None if self.zero_point is None else torch.round(self.zero_point.detach().float())
        if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise SlimquantError(f"QAT{self.where}: a learned weight scale is 0 or not finite (the training diverged); "
                                 "lower the learning rate of the quantizer scales")  # fmt: skip
        q = quantize(grouped(w, self.spec), scale.unsqueeze(-1), None if zp is None else zp.unsqueeze(-1), qt)
        return QuantizedWeight(q.reshape(w.shape), scale.contiguous(), None if zp is None else zp.contiguous())

    def extra_repr(self) -> str:
        return f"{self.role}, {self.spec.describe()}, ranges={self.ranges}"


class SLBWeightQuantizer(nn.Module):
    """SLB ("Searching for Low-Bit Weights", Yang et al. 2020; Golden Stick's SLB): every weight is a learned
    categorical distribution over the grid's levels instead of a float value.

    ``logits`` ``[n, k, L]`` (Parameter) over the ``L`` levels (the spec's integer grid, or ``{-1, +1}`` when
    ``binary``: 1-bit weights stored on the int2 grid), times a per-channel / per-group ``scale`` (fixed: the RTN
    scale of the starting weights, or their mean absolute value for binary weights). Training forward: the
    expectation ``scale * sum_l softmax(logits / t)_l * level_l`` with the temperature ``t`` annealed
    exponentially from ``temperature[0]`` to ``temperature[1]`` over ``anneal_steps`` training steps (after which
    it stays at the end value); eval forward and :meth:`quantized_weight`: the most likely level, which is what
    the converted layer stores. The logits start at ``-(w / scale - level)^2 / 0.5``, so the distribution begins
    near the rounded weight. The layer's float weight no longer enters the forward (the logits replace it):
    build the optimizer after :func:`slimquant.prepare_qat`."""

    ranges = "slb"

    def __init__(self, spec: QuantSpec, weight: torch.Tensor, binary: bool, temperature: tuple[float, float],
                 anneal_steps: int) -> None:  # fmt: skip
        super().__init__()
        self.where = ""
        qt = lookup_qtype(spec.qtype)
        if qt.is_float or not qt.signed or not spec.symmetric or not 2 <= qt.bits <= 4 or spec.gguf is not None:
            raise SlimquantError(f"SLB searches signed symmetric 2-4 bit integer weights (int2 .. int4; binary: int2), "
                                 f"got {spec.describe()}")  # fmt: skip
        if binary and qt.bits != 2:
            raise SlimquantError(f"binary SLB weights ({{-1, +1}}) are stored on the int2 grid, not {spec.qtype}")
        self.spec, self.binary = spec, binary
        self.t_start, self.t_end = float(temperature[0]), float(temperature[1])
        self.anneal_steps = int(anneal_steps)
        qmin, qmax = grid(qt)
        w = weight.detach().float()
        levels = torch.tensor([-1.0, 1.0]) if binary else torch.arange(qmin, qmax + 1.0)
        self.register_buffer("levels", levels.to(w.device))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=w.device))
        wg = grouped(w, spec)
        if binary:
            scale = wg.abs().mean(-1).clamp_min(1e-12)
        else:
            scale = quantize_weight(w, spec).scale
        self.register_buffer("scale", scale.clone())
        v = (wg / scale.unsqueeze(-1)).reshape(w.shape)
        self.logits = nn.Parameter(-((v.unsqueeze(-1) - self.levels) ** 2) / 0.5)
        self.shape = tuple(w.shape)

    def temperature(self) -> float:
        frac = min(int(self.steps), self.anneal_steps) / self.anneal_steps
        return self.t_start * (self.t_end / self.t_start) ** frac

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self.steps += 1
            p = torch.softmax(self.logits / self.temperature(), dim=-1)
            v = (p * self.levels).sum(-1)
        else:
            v = self.levels[self.logits.argmax(-1)]
        wg = grouped(v, self.spec) * self.scale.unsqueeze(-1)
        return wg.reshape(self.shape).to(w.dtype)

    def quantized_weight(self, w: torch.Tensor) -> QuantizedWeight:
        """The most likely levels (int8 values on the spec's grid), the scales and no zero point."""
        q = self.levels[self.logits.detach().argmax(-1)].to(torch.int8)
        return QuantizedWeight(q, self.scale.clone().contiguous(), None)

    def extra_repr(self) -> str:
        return (f"weight, {self.spec.describe()}, ranges=slb{' binary' if self.binary else ''}, "
                f"t {self.t_start} -> {self.t_end} over {self.anneal_steps} steps")  # fmt: skip


def _check_bias_scale(scale: torch.Tensor) -> None:
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise SlimquantError("QAT: the accumulator scale of an int8 layer is not positive and finite")


class _QATLayer(nn.Module):
    """Shared by the QAT Linear / Conv2d: ``weight`` / ``bias`` Parameters, ``weight_quant``, ``input_quant``."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_quant: FakeQuantizer
    input_quant: FakeQuantizer | None

    def _init_quant(self, weight_spec: QuantSpec, input_spec: QuantSpec | None, ranges: str, momentum: float,
                    freeze_observers_after: int | None, slb: dict[str, Any] | None = None) -> None:  # fmt: skip
        if self.weight.dtype != torch.float32:
            raise NotSupportedYet(f"QAT trains float32 weights; this layer's are {self.weight.dtype} (cast the model "
                                  "with .float() before prepare_qat; half-precision QAT is not supported yet)")  # fmt: skip
        check_weight_shape(tuple(self.weight_2d().shape), weight_spec)  # type: ignore[arg-type]
        if isinstance(self, QATConv2d) and input_spec is not None and input_spec.dynamic:
            raise SlimquantError("a convolution's input is quantized statically (per_tensor); dynamic per-token "
                                 "inputs apply to Linear layers")  # fmt: skip
        if ranges == "slb":
            if isinstance(self, QATConvBn2d):
                raise SlimquantError("SLB learns the weights' levels directly; it trains with the BatchNorm after "
                                     "the convolution, not folded into it (QAT(fold_bn=False))")  # fmt: skip
            self.weight_quant = SLBWeightQuantizer(weight_spec, self.weight_2d(), **(slb or {}))
            ranges = "observer"  # SLB's inputs: observed ranges
        else:
            self.weight_quant = FakeQuantizer(weight_spec, "weight", ranges, weight=self.weight_2d())
        self.input_quant = (None if input_spec is None else
                            FakeQuantizer(input_spec, "input", ranges, momentum, freeze_observers_after,
                                          device=self.weight.device))  # fmt: skip

    def weight_2d(self) -> torch.Tensor:
        """The (folded) weight as the quantizer sees it, ``[n, k]``."""
        return self.weight.reshape(self.weight.shape[0], -1)

    def int8_bias(self) -> bool:
        """Whether the converted layer keeps its bias in int32 accumulator units (an int8 W8A8 Linear with a
        static input: :class:`slimquant.nn.QLinearW8A8`), so training sees the same rounded bias."""
        return False

    def _bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        if bias is None or not self.int8_bias() or self.input_quant is None:
            return bias
        s_in, _ = self.input_quant.input_params()
        w_scale = self.weight_quant.quantized_weight(self.weight_2d()).scale.reshape(-1)
        # as kernels.int8.quantize_bias: the float32 accumulator scale, the division in float64
        acc = (s_in.double().reshape(1) * w_scale.double()).float()
        _check_bias_scale(acc)
        return (round_ste(bias.double() / acc.double()).float() * acc).to(bias.dtype)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quant is None else self.input_quant(x)


class QATLinear(_QATLayer):
    """``nn.Linear`` trained through fake-quantized weights (and inputs)."""

    def __init__(self, linear: nn.Linear, weight_spec: QuantSpec, input_spec: QuantSpec | None = None,
                 ranges: str = "observer", momentum: float = 0.9, freeze_observers_after: int | None = None,
                 slb: dict[str, Any] | None = None) -> None:  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._init_quant(weight_spec, input_spec, ranges, momentum, freeze_observers_after, slb)

    def int8_bias(self) -> bool:
        inp = None if self.input_quant is None else self.input_quant.spec
        return inp is not None and not inp.dynamic and _runs_w8a8(self.weight_quant.spec, inp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._input(x)
        return F.linear(x, self.weight_quant(self.weight), self._bias(self.bias))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _runs_w8a8(weight: QuantSpec, inp: QuantSpec | None) -> bool:
    """Whether a Linear with these specs converts to the int8 kernels' :class:`QLinearW8A8` (int8 symmetric
    per-channel / per-tensor weights, int8 inputs)."""
    if inp is None:
        return False
    wq, iq = lookup_qtype(weight.qtype), lookup_qtype(inp.qtype)
    return (wq.name == "int8" and iq.name == "int8" and weight.symmetric and weight.gguf is None
            and weight.granularity in (Granularity.PER_CHANNEL, Granularity.PER_TENSOR))  # fmt: skip


class QATConv2d(_QATLayer):
    """``nn.Conv2d`` trained through fake-quantized weights (and static per-tensor inputs)."""

    def __init__(self, conv: nn.Conv2d, weight_spec: QuantSpec, input_spec: QuantSpec | None = None,
                 ranges: str = "observer", momentum: float = 0.9, freeze_observers_after: int | None = None,
                 slb: dict[str, Any] | None = None) -> None:  # fmt: skip
        super().__init__()
        self._take_conv(conv)
        self._init_quant(weight_spec, input_spec, ranges, momentum, freeze_observers_after, slb)

    def _take_conv(self, conv: nn.Conv2d) -> None:
        """The convolution's hyperparameters and its ``weight`` / ``bias`` Parameters (the same objects)."""
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode"):  # fmt: skip
            setattr(self, attr, getattr(conv, attr))
        self._padding_twice = list(conv._reversed_padding_repeated_twice)
        self.weight = conv.weight
        self.bias = conv.bias

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros":  # as nn.Conv2d: pad first, then convolve without padding
            x = F.pad(x, self._padding_twice, mode=self.padding_mode)
            return F.conv2d(x, w, b, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._input(x)
        w = self.weight_quant(self.weight_2d()).reshape(self.weight.shape)
        return self._conv(x, w, self.bias)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight [out, in/groups, kh, kw], bias)`` the converted layer quantizes and adds."""
        return self.weight.detach(), None if self.bias is None else self.bias.detach()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, bias={self.bias is not None}")  # fmt: skip


class QATConvBn2d(QATConv2d):
    """A Conv2d and the BatchNorm2d after it, trained with the BN folded into the fake-quantized weight."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, weight_spec: QuantSpec, input_spec: QuantSpec | None = None,
                 ranges: str = "observer", momentum: float = 0.9, freeze_observers_after: int | None = None,
                 freeze_bn_after: int | None = None, bn_name: str = "") -> None:  # fmt: skip
        if not (bn.affine and bn.track_running_stats) or bn.num_features != conv.out_channels:
            raise SlimquantError("BN folding needs an affine BatchNorm2d tracking running statistics over the "
                                 f"convolution's {conv.out_channels} output channels")  # fmt: skip
        nn.Module.__init__(self)
        self._take_conv(conv)
        self.bn = bn
        self.bn_name = bn_name  # where the BN was in the model (now nn.Identity there), for the converted layer
        self.freeze_bn_after = freeze_bn_after
        self.register_buffer("bn_steps", torch.zeros((), dtype=torch.int64, device=conv.weight.device))
        self.register_buffer("bn_frozen", torch.zeros((), dtype=torch.bool, device=conv.weight.device))
        self._init_quant(weight_spec, input_spec, ranges, momentum, freeze_observers_after)

    def _factor(self) -> torch.Tensor:
        return self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)  # type: ignore[operator]

    def weight_2d(self) -> torch.Tensor:
        f = self._factor().reshape(-1, 1) if hasattr(self, "bn") else 1.0
        return self.weight.reshape(self.weight.shape[0], -1) * f

    def _folded_bias(self) -> torch.Tensor:
        b = self.bias if self.bias is not None else torch.zeros_like(self.bn.running_mean)  # type: ignore[arg-type]
        return self.bn.bias + (b - self.bn.running_mean) * self._factor()  # type: ignore[operator]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        learning = self.training and torch.is_grad_enabled()
        if learning:
            self.bn_steps += 1
            if self.freeze_bn_after is not None and int(self.bn_steps) > self.freeze_bn_after:
                self.bn_frozen.fill_(True)
        x = self._input(x)
        w = self.weight_quant(self.weight_2d()).reshape(self.weight.shape)
        if not (learning and not bool(self.bn_frozen)):  # running statistics: what the converted layer computes
            return self._conv(x, w, self._folded_bias())
        factor = self._factor().reshape(1, -1, 1, 1)
        # channels with gamma == 0 have a zero folded weight; any finite value works there (the BN outputs beta)
        safe = torch.where(factor.abs() > 0, factor, torch.ones_like(factor))
        y = self._conv(x, w, None) / safe  # the convolution with the unscaled (but quantized) weight
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        self.bn.train()
        return self.bn(y)  # batch statistics, running ones updated

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.no_grad():
            return self.weight_2d().reshape(self.weight.shape).detach().clone(), self._folded_bias().detach().clone()

    def extra_repr(self) -> str:
        return super().extra_repr() + ", BN folded"


QAT_LAYERS = (QATLinear, QATConv2d)
WEIGHT_QUANTIZERS = (FakeQuantizer, SLBWeightQuantizer)


def freeze_bn(model: nn.Module) -> int:
    """Freeze the BN statistics of every :class:`QATConvBn2d` in ``model`` (train with the running ones from now
    on); returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, QATConvBn2d):
            m.bn_frozen.fill_(True)
            n += 1
    return n


def freeze_observers(model: nn.Module) -> int:
    """Stop every observed input range of ``model`` from moving; returns how many quantizers were frozen."""
    n = 0
    for m in model.modules():
        if isinstance(m, FakeQuantizer):
            m.observing.fill_(False)
            n += 1
    return n


def describe_state(model: nn.Module) -> dict[str, Any]:
    """Counts of the QAT layers and quantizers of ``model`` (for logs)."""
    layers = [m for m in model.modules() if isinstance(m, QAT_LAYERS)]
    return {"layers": len(layers), "bn_folded": sum(isinstance(m, QATConvBn2d) for m in layers),
            "input_quantized": sum(m.input_quant is not None for m in layers)}  # fmt: skip
