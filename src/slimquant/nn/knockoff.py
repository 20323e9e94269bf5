"""SCOP's knockoff convolution (Tang et al., "SCOP: Scientific Control for Reliable Neural Network Pruning",
NeurIPS 2020; MindSpore Golden Stick's ``PrunerKfCompressAlgo``).

In training the batch holds real inputs in its first half and their knockoffs (inputs with the same distribution
but no relation to the first half's labels) in the second. The convolution's output channels are mixed per
channel: ``[beta * y_real + (1 - beta) * y_knockoff, y_knockoff]`` with a learned ``beta`` (``kf_scale``, from 0.5,
used clamped to [0, 1]); a channel the task needs leans towards its real features (``beta -> 1``), a redundant one does
not care. In eval mode it is the plain convolution."""

from __future__ import annotations

import torch
from torch import nn


class KnockoffConv2d(nn.Module):
    """Wraps ``conv`` (its tensors are shared, not copied); only ``kf_scale`` ``[out_channels]`` is new."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        self.kf_scale = nn.Parameter(torch.full((conv.out_channels,), 0.5, device=conv.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if not self.training:
            return y
        if y.shape[0] % 2:
            raise ValueError("KnockoffConv2d trains on batches of real inputs followed by as many knockoffs; got an "
                             f"odd batch of {y.shape[0]}")  # fmt: skip
        h = y.shape[0] // 2
        # kept in [0, 1] functionally (an in-place projection here would break a second forward before backward);
        # the mix the pruning scores read is clamped the same way
        s = self.kf_scale.clamp(0.0, 1.0).view(1, -1, 1, 1).to(y.dtype)
        return torch.cat((s * y[:h] + (1 - s) * y[h:], y[h:]), dim=0)
