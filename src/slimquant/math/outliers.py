"""Outlier detection on a set of magnitudes (pure functions, no state): CBQ's coarse-to-fine detection (Ding et
al., "CBQ: Cross-Block Quantization for Large Language Models").

* :func:`coarse_outliers`: the values above ``Q3 + k * IQR`` (the coarse candidates).
* :func:`coarse_to_fine_outliers`: among the coarse candidates, the split of the sorted candidates that maximises
  the gap between the two sets' means minus ``lambda`` times their spread; the upper set are the outliers.

Both return a boolean mask of the input's shape. Used by ``CBQPreprocess``
(:mod:`slimquant.algorithms.builtin`) on input channels' ranges and on weight magnitudes.
"""

from __future__ import annotations

import math

import torch


def coarse_outliers(values: torch.Tensor, iqr_factor: float = 1.5, max_quantile_elements: int = 1 << 22) -> torch.Tensor:
    """Boolean mask of the values above ``Q3 + iqr_factor * (Q3 - Q1)`` (quartiles of all values, estimated on an
    even subsample of at most ``max_quantile_elements``): CBQ's coarse outlier candidates."""
    flat = values.detach().float().reshape(-1)
    if flat.numel() < 4:
        return torch.zeros_like(values, dtype=torch.bool)
    sample = flat if flat.numel() <= max_quantile_elements else flat[:: math.ceil(flat.numel() / max_quantile_elements)]
    q1, q3 = torch.quantile(sample, torch.tensor([0.25, 0.75])).tolist()
    return (flat > q3 + iqr_factor * (q3 - q1)).reshape(values.shape)


def coarse_to_fine_outliers(values: torch.Tensor, iqr_factor: float = 1.5, fine_lambda: float = 1.0,
                            max_quantile_elements: int = 1 << 22) -> torch.Tensor:  # fmt: skip
    """Boolean mask of the outliers among the magnitudes ``values`` (any shape, >= 0 expected).

    Coarse: candidates are the values above ``Q3 + iqr_factor * (Q3 - Q1)`` (quartiles of all values; estimated on
    an even subsample of at most ``max_quantile_elements``). Fine: with the candidates sorted ``c_1 <= ... <= c_m``,
    every split into ``{c_1..c_i}`` (back to the ordinary values) and ``{c_{i+1}..c_m}`` (``i = 0 .. m - 1``) is
    scored ``between - fine_lambda * within`` on the candidates together with the largest ordinary value (so a
    lone candidate is compared with what it stands out from): ``between`` the squared distance between the two
    sets' means, ``within`` the sum of the two sets' variances (unweighted, so ``fine_lambda`` trades a wide gap
    against tight sets; size-weighted variances would make every ``fine_lambda`` pick the same split); the best
    split's upper set are the outliers. No candidate: an all-False mask."""
    v = values.detach().float()
    flat = v.reshape(-1)
    cand = coarse_outliers(flat, iqr_factor, max_quantile_elements)
    m = int(cand.sum())
    if m == 0:
        return torch.zeros_like(v, dtype=torch.bool)
    c, order = torch.sort(flat[cand])
    ordinary = flat[~cand]
    base = float(ordinary.max()) if ordinary.numel() else float(c[0])
    x = torch.cat([torch.tensor([base], dtype=torch.float64), c.double()]) if ordinary.numel() else c.double()
    n = x.numel()
    if n < 2:  # a lone candidate and nothing ordinary to compare it with
        return cand.reshape(v.shape)
    # splits after position i (lower = x[:i], upper = x[i:]), i = 1 .. n - 1 (the base value always stays lower)
    lo_n = torch.arange(1, n, dtype=torch.float64)
    hi_n = n - lo_n
    cs, cs2 = torch.cumsum(x, 0), torch.cumsum(x * x, 0)
    lo_s, lo_s2 = cs[:-1], cs2[:-1]
    hi_s, hi_s2 = cs[-1] - lo_s, cs2[-1] - lo_s2
    lo_mu, hi_mu = lo_s / lo_n, hi_s / hi_n
    within = ((lo_s2 / lo_n - lo_mu**2) + (hi_s2 / hi_n - hi_mu**2)).clamp(min=0.0)
    between = (hi_mu - lo_mu) ** 2
    score = between - fine_lambda * within
    i = int(torch.argmax(score)) + 1  # x[i:] are the outliers
    first = i - (1 if ordinary.numel() else 0)  # index into the sorted candidates
    keep = torch.zeros(m, dtype=torch.bool)
    keep[order[first:]] = True
    out = torch.zeros_like(flat, dtype=torch.bool)
    out[cand.nonzero().squeeze(1)] = keep
    return out.reshape(v.shape)
