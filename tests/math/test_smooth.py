"""SmoothQuant scales (pure)."""

from __future__ import annotations

import pytest
import torch

from slimquant.math.smooth import smoothquant_scales


def test_formula_and_alpha_extremes():
    a = torch.tensor([4.0, 1.0, 100.0])
    w = torch.tensor([0.5, 2.0, 0.1])
    torch.testing.assert_close(smoothquant_scales(a, w, 0.5), (a.sqrt() / w.sqrt()))
    torch.testing.assert_close(smoothquant_scales(a, w, 1.0), a)
    torch.testing.assert_close(smoothquant_scales(a, w, 0.0), 1.0 / w)


def test_after_smoothing_the_max_ratio_is_balanced():
    # alpha = 0.5: max|X_j / s_j| == max|W_j * s_j| for every channel
    a = torch.tensor([30.0, 0.2, 5.0])
    w = torch.tensor([0.01, 0.4, 0.3])
    s = smoothquant_scales(a, w, 0.5)
    torch.testing.assert_close(a / s, w * s)


def test_dead_channels_get_one_and_alpha_is_checked():
    s = smoothquant_scales(torch.tensor([0.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 1.0]), 0.5)
    assert s[0] == 1.0 and s[1] == 1.0 and s[2] == pytest.approx(3.0**0.5)
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_scales(torch.ones(2), torch.ones(2), 1.5)
