"""Calibration observers: running statistics of tensors, summarised as a clipping range.

Every observer takes ``update(x)`` for batches of any float dtype (fp16/bf16 included; read in
float32, sums kept in float64), ignores empty tensors and raises ``ValueError`` on NaN/Inf so that
calibration problems are loud. ``range()`` gives ``(rmin, rmax)`` as float32 tensors of shape
``[]`` (per tensor) or ``[C]`` (``axis`` kept, all other dims reduced), and ``qparams`` turns it
into a scale and zero point with :func:`slimquant.math.qparams.qparams_from_minmax`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch

from slimquant.math.qparams import qparams_from_minmax
from slimquant.math.ranges import (
    histogram_kl_range,
    histogram_mse_range,
    histogram_percentile_range,
    rebin_histogram,
    sigma_range,
)
from slimquant.types.qtype import QType, qtype as lookup_qtype

logger = logging.getLogger(__name__)

HISTOGRAM_METHODS = ("percentile", "mse", "kl")


class Observer(ABC):
    """Base class: validates batches, hands them to ``_update`` and turns ranges into qparams."""

    def __init__(self) -> None:
        self.reset()

    def update(self, x: torch.Tensor) -> None:
        """Fold a batch (any shape) into the statistics."""
        if x.numel() == 0:
            return
        x = x.detach().float()
        if not bool(torch.isfinite(x).all()):
            raise ValueError("observer saw NaN/Inf")
        self._update(x)

    @abstractmethod
    def _update(self, x: torch.Tensor) -> None:
        """Fold a non-empty, finite float32 batch into the statistics."""

    @abstractmethod
    def reset(self) -> None:
        """Forget everything seen."""

    @abstractmethod
    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rmin, rmax)``, float32, shape ``[]`` or ``[C]``; RuntimeError before any data."""

    def qparams(
        self, qt: QType | str, symmetric: bool, reduce_range: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(scale, zero_point)`` of the observed range (zero_point None when symmetric)."""
        qt = lookup_qtype(qt)
        rmin, rmax = self._range_for(qt, symmetric, reduce_range)
        return qparams_from_minmax(rmin, rmax, qt, symmetric, reduce_range)

    def _range_for(self, qt: QType, symmetric: bool, reduce_range: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # Ranges that depend on the target grid (histogram MSE/KL) override this.
        return self.range()


class MinMaxObserver(Observer):
    """Running minimum and maximum, per tensor (``axis=None``) or per index along ``axis``.

    ``axis=-1`` on a Linear input ``[..., k]`` gives per-input-channel ranges ``[k]``.
    """

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        super().__init__()

    def reset(self) -> None:
        self._min: torch.Tensor | None = None
        self._max: torch.Tensor | None = None

    def _update(self, x: torch.Tensor) -> None:
        bmin, bmax = torch.aminmax(_rows(x, self.axis), dim=1)
        bmin, bmax = _unrow(bmin, self.axis), _unrow(bmax, self.axis)
        if self._min is None or self._max is None:
            self._min, self._max = bmin, bmax
            return
        _check_channels(self._min, bmin, self.axis)
        self._min, self._max = self._merge(self._min, self._max, bmin, bmax)

    def _merge(
        self, old_min: torch.Tensor, old_max: torch.Tensor, new_min: torch.Tensor, new_max: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.minimum(old_min, new_min), torch.maximum(old_max, new_max)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._min is None or self._max is None:
            raise RuntimeError("observer has seen no data")
        return self._min.clone(), self._max.clone()


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of each batch's min and max; the first batch initialises.

    ``min <- min + averaging_constant * (batch_min - min)`` (likewise max), as PyTorch's observer.
    """

    def __init__(self, averaging_constant: float = 0.01, axis: int | None = None) -> None:
        if not 0 < averaging_constant <= 1:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.averaging_constant = averaging_constant
        super().__init__(axis)

    def _merge(
        self, old_min: torch.Tensor, old_max: torch.Tensor, new_min: torch.Tensor, new_max: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.averaging_constant
        return old_min + c * (new_min - old_min), old_max + c * (new_max - old_max)


class HistogramObserver(Observer):
    """Per-tensor histogram of ``bins`` equal bins over the observed ``[min, max]``.

    When a batch falls outside, the bins widen to the new min/max and the old counts are
    redistributed by overlap (:func:`rebin_histogram`; repeated growth blurs the old shape slightly).
    ``method`` picks the range: ``percentile`` (keeps ``percentile`` percent of the mass), ``mse`` or
    ``kl`` (searched for the grid of ``qt``). ``range()`` uses ``qt``/``symmetric`` given here;
    ``qparams`` searches for the qtype and symmetry it is asked for.
    """

    def __init__(
        self,
        bins: int = 2048,
        method: str = "percentile",
        percentile: float = 99.99,
        qt: QType | str = "int8",
        symmetric: bool = False,
    ) -> None:
        if method not in HISTOGRAM_METHODS:
            raise ValueError(f"unknown histogram method {method!r}; valid: {', '.join(HISTOGRAM_METHODS)}")
        if bins < 1:
            raise ValueError(f"bins must be positive, got {bins}")
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.bins, self.method, self.percentile = bins, method, percentile
        self.qt, self.symmetric = lookup_qtype(qt), symmetric
        super().__init__()

    def reset(self) -> None:
        self._hist = torch.zeros(self.bins, dtype=torch.float64)
        self._min: float | None = None
        self._max: float | None = None

    def histogram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(counts [bins] float64, edges [bins + 1] float64)``; edges run from the observed min to max."""
        if self._min is None or self._max is None:
            raise RuntimeError("observer has seen no data")
        return self._hist.clone(), torch.linspace(self._min, self._max, self.bins + 1, dtype=torch.float64)

    def _update(self, x: torch.Tensor) -> None:
        bmin, bmax = (float(v) for v in torch.aminmax(x))
        if self._min is None or self._max is None:
            self._min, self._max = bmin, bmax
        elif bmin < self._min or bmax > self._max:
            old_hist, old_edges = self.histogram()
            self._min, self._max = min(self._min, bmin), max(self._max, bmax)
            self._hist = rebin_histogram(old_hist, old_edges, self.histogram()[1])
        width = self._max - self._min
        per_unit = self.bins / width if width > 0 else 0.0  # a constant so far: everything in bin 0
        idx = ((x.flatten() - self._min) * per_unit).floor().clamp(0, self.bins - 1).long()
        self._hist += torch.bincount(idx, minlength=self.bins).double()

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._range_for(self.qt, self.symmetric, False)

    def _range_for(self, qt: QType, symmetric: bool, reduce_range: bool) -> tuple[torch.Tensor, torch.Tensor]:
        hist, edges = self.histogram()
        if self.method == "percentile":
            rmin, rmax = histogram_percentile_range(hist, edges, self.percentile, symmetric)
        elif self.method == "mse":
            rmin, rmax = histogram_mse_range(hist, edges, qt, symmetric, reduce_range)
        else:
            rmin, rmax = histogram_kl_range(hist, edges, qt, symmetric, reduce_range)
        logger.debug("histogram %s range [%g, %g] of [%g, %g]", self.method, rmin, rmax, self._min, self._max)
        return rmin.float(), rmax.float()


class SigmaObserver(Observer):
    """Running mean and variance (float64, merged batch by batch with Chan's formula) and min/max.

    ``range()`` is ``mean +- k * std`` (population std) intersected with ``[min, max]``: msModelSlim's
    ``use_sigma`` / ``sigma_factor``. Per tensor or per index along ``axis``.
    """

    def __init__(self, k: float = 3.0, axis: int | None = None) -> None:
        if not k > 0:
            raise ValueError(f"k must be positive, got {k}")
        self.k, self.axis = k, axis
        super().__init__()

    def reset(self) -> None:
        self._n = 0
        self._stats: tuple[torch.Tensor, ...] | None = None  # mean, sum of squared deviations, min, max

    def _update(self, x: torch.Tensor) -> None:
        rows = _rows(x, self.axis).double()
        n = rows.shape[1]
        mean = rows.mean(1)
        m2 = (rows - mean[:, None]).pow(2).sum(1)
        bmin, bmax = torch.aminmax(rows, dim=1)
        if self._stats is None:
            self._stats = (mean, m2, bmin, bmax)
        else:
            old_mean, old_m2, old_min, old_max = self._stats
            _check_channels(old_mean, mean, self.axis)
            total = self._n + n
            delta = mean - old_mean
            self._stats = (
                old_mean + delta * (n / total),
                old_m2 + m2 + delta.pow(2) * (self._n * n / total),
                torch.minimum(old_min, bmin),
                torch.maximum(old_max, bmax),
            )
        self._n += n

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stats is None:
            raise RuntimeError("observer has seen no data")
        mean, m2, xmin, xmax = self._stats
        rmin, rmax = sigma_range(mean, (m2 / self._n).sqrt(), self.k, xmin, xmax)
        return _unrow(rmin, self.axis).float(), _unrow(rmax, self.axis).float()


class TokenQuantileObserver(Observer):
    """Per-token minima and maxima of every row seen (rows = tokens of ``[..., k]`` inputs).

    ``range()`` is ``(quantile(mins, 1 - q), quantile(maxs, q))`` for ``q = quantile``: Outlier
    Suppression's token-wise clipping, which lets a few outlier tokens be clipped instead of
    stretching the range for every token. ``quantile=1`` is plain min-max.
    """

    def __init__(self, quantile: float = 1.0) -> None:
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        self.quantile = quantile
        super().__init__()

    def reset(self) -> None:
        self._mins: list[torch.Tensor] = []
        self._maxs: list[torch.Tensor] = []

    def _update(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)
        lo, hi = torch.aminmax(rows, dim=1)
        self._mins.append(lo.double())
        self._maxs.append(hi.double())

    def range_at(self, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The range clipping the ``1 - quantile`` most extreme tokens on each side."""
        if not self._mins:
            raise RuntimeError("observer has seen no data")
        mins, maxs = torch.cat(self._mins), torch.cat(self._maxs)
        return torch.quantile(mins, 1.0 - quantile).float(), torch.quantile(maxs, quantile).float()

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.range_at(self.quantile)


_REGISTRY: Mapping[str, Callable[..., Observer]] = MappingProxyType(
    {
        "minmax": MinMaxObserver,
        "moving_average": MovingAverageMinMaxObserver,
        "histogram_percentile": lambda **kw: HistogramObserver(method="percentile", **kw),
        "histogram_mse": lambda **kw: HistogramObserver(method="mse", **kw),
        "histogram_kl": lambda **kw: HistogramObserver(method="kl", **kw),
        "sigma": SigmaObserver,
        "token_quantile": TokenQuantileObserver,
    }
)
OBSERVERS = tuple(_REGISTRY)


def make_observer(name: str, **kwargs: object) -> Observer:
    """Build the observer registered as ``name`` (:data:`OBSERVERS`) with its keyword arguments."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown observer {name!r}; valid: {', '.join(OBSERVERS)}") from None
    return factory(**kwargs)


def _rows(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``x`` as ``[C, N]``: one row per index along ``axis`` (a single row when ``axis`` is None)."""
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _unrow(values: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Per-row results ``[C]`` back to the observer's shape: ``[]`` per tensor."""
    return values[0] if axis is None else values


def _check_channels(old: torch.Tensor, new: torch.Tensor, axis: int | None) -> None:
    if old.shape != new.shape:
        raise ValueError(f"observer saw {new.numel()} channels along axis {axis}, expected {old.numel()}")
