"""A user's own model and functions for ``slimquant tune`` (and the search): a small CNN on scikit-learn's
bundled 8x8 digits (no download). The task file registers these functions by name.

- ``build(config)``: the model, trained here in a few seconds (seeded, so every call gives the same weights).
- ``example_input()``: one batch of inputs.
- ``calibrate(model, config)``: runs the model on training images (slimquant records these calls as calibration).
- ``accuracy(model, config)``: top-1 accuracy (percent) on the held-out images.
"""

from __future__ import annotations

import torch
from torch import nn


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8] in [0, 1]
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]  # train / held-out


class DigitsCNN(nn.Sequential):
    def __init__(self, width: int = 32) -> None:
        super().__init__(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 4, 128), nn.ReLU(), nn.Linear(128, 10),
        )  # fmt: skip


def build(config: dict | None = None) -> nn.Module:
    config = config or {}
    torch.manual_seed(int(config.get("seed", 0)))
    model = DigitsCNN(int(config.get("width", 32)))
    xtr, ytr, _, _ = _data()
    opt = torch.optim.Adam(model.parameters(), lr=float(config.get("lr", 3e-3)))
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(int(config.get("epochs", 6))):
        for idx in torch.randperm(len(xtr), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    return model.eval()


def example_input(config: dict | None = None) -> torch.Tensor:
    return _data()[2][:32]


def calibrate(model: nn.Module, config: dict | None = None) -> None:
    xtr = _data()[0]
    n = int((config or {}).get("batches", 4))
    with torch.no_grad():
        for b in xtr[: 64 * n].split(64):
            model(b)


def accuracy(model: nn.Module, config: dict | None = None) -> float:
    _, _, xte, yte = _data()
    with torch.no_grad():
        return 100.0 * float((model(xte).argmax(-1) == yte).float().mean())
