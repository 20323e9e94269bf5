"""Error metrics: SQNR, cosine similarity, KL divergence, top-1 agreement."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slimquant.math import cosine_similarity, kl_divergence, sqnr_db, top1_agreement


def test_sqnr_is_inf_on_identical_tensors() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 7)
    assert sqnr_db(x, x.clone()) == math.inf
    assert sqnr_db(x.bfloat16(), x.bfloat16()) == math.inf


def test_sqnr_known_values() -> None:
    ref = torch.ones(4, dtype=torch.float64)
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0, abs=1e-9)  # signal 4, noise 4 * 0.01
    ref = torch.tensor([3.0, 4.0])
    assert sqnr_db(ref, torch.tensor([3.0, 3.0])) == pytest.approx(10 * math.log10(25.0), abs=1e-12)
    assert sqnr_db(ref, torch.zeros(2)) == pytest.approx(0.0, abs=1e-12)  # noise == signal


def test_sqnr_accepts_mixed_dtypes_and_accumulates_in_float64() -> None:
    ref = torch.full((100_000,), 1000.0, dtype=torch.float64)
    approx = (ref + 0.125).float()  # 1000.125 is exact in float32; noise 1/64 per element, signal 1e6
    assert sqnr_db(ref, approx) == pytest.approx(10 * math.log10(64e6), abs=1e-9)  # 78.06 dB


def test_cosine_similarity() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 2.0], [-1.0, -2.0]])
    cs = cosine_similarity(a, b)
    assert cs.dtype == torch.float64
    assert cs.tolist() == pytest.approx([0.0, 1.0, -1.0], abs=1e-12)
    assert cosine_similarity(a, b, dim=0).shape == (2,)


def test_kl_is_zero_on_identical_logits() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 50)
    kl = kl_divergence(logits, logits.clone())
    assert kl.shape == (2, 3) and kl.dtype == torch.float64
    assert torch.equal(kl, torch.zeros(2, 3, dtype=torch.float64))
    # shifting logits by a constant leaves the distribution unchanged
    assert torch.allclose(kl_divergence(logits, logits + 5.0), torch.zeros(2, 3, dtype=torch.float64), atol=1e-12)


def test_kl_is_positive_and_matches_torch_kl_div() -> None:
    torch.manual_seed(0)
    ref = torch.randn(4, 6, 32)
    other = ref + 0.5 * torch.randn(4, 6, 32)
    kl = kl_divergence(ref, other)
    assert bool((kl > 0).all())
    expected = F.kl_div(
        torch.log_softmax(other.double(), -1), torch.log_softmax(ref.double(), -1), reduction="none", log_target=True
    ).sum(-1)
    torch.testing.assert_close(kl, expected, rtol=1e-10, atol=1e-12)
    # KL is not symmetric
    assert not torch.allclose(kl, kl_divergence(other, ref))


def test_kl_of_two_point_distributions_by_hand() -> None:
    p = torch.tensor([0.75, 0.25], dtype=torch.float64)
    q = torch.tensor([0.5, 0.5], dtype=torch.float64)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # 0.130812
    assert kl_divergence(p.log(), q.log()).item() == pytest.approx(expected, rel=1e-12)


def test_top1_agreement() -> None:
    ref = torch.tensor([[[0.1, 0.9, 0.0], [2.0, 1.0, 0.0]], [[0.0, 0.0, 1.0], [0.3, 0.2, 0.1]]])
    other = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 5.0], [0.9, 0.2, 0.1]]])
    agree = top1_agreement(ref, other)
    assert agree.dtype == torch.float64 and agree.shape == (2, 2)
    assert agree.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    assert agree.mean().item() == 0.75
