"""End-to-end distillation of the scales (slimquant.distill): it starts at the post-training model, lowers the
held-out KL to the float model, changes only the scales, keeps the best step, and refuses what it cannot tune."""

from __future__ import annotations

import copy

import pytest
import torch

import slimquant as sq
from slimquant.errors import NotSupportedYet, SlimquantError
from slimquant.nn import QLinear
from slimquant.types.spec import QuantSpec, Recipe


def _windows(vocab: int, n: int = 6, length: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(3))


def test_distill_lowers_held_out_kl_and_changes_only_scales(llama, tokenizer, tmp_path) -> None:  # noqa: ANN001
    teacher = copy.deepcopy(llama)
    result = sq.quantize(llama, Recipe(weight=QuantSpec("int3", "per_group", 32, symmetric=False)), show_progress=False)
    before = {k: v.clone() for k, v in result.model.state_dict().items()}
    grads = [p.requires_grad for p in result.model.parameters()]
    rep = sq.distill(result, teacher, _windows(llama.config.vocab_size), steps=30, lr=1e-2, eval_every=5,
                     show_progress=False)  # fmt: skip
    assert rep.layers == 14 and rep.steps == 30 and rep.history[0] == (0, rep.kl_before)
    assert rep.kl_after < 0.95 * rep.kl_before  # observed 0.87x on this random tiny model (int3 g32)
    after = result.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("weight_scale") for k in changed)
    assert not any(type(m).__name__ == "_ScaleTuned" for m in result.model.modules())
    assert isinstance(result.model.model.layers[0].mlp.up_proj, QLinear)
    assert [p.requires_grad for p in result.model.parameters()] == grads
    sq.save(result, tmp_path / "q", tokenizer=tokenizer)  # still a plain quantized checkpoint
    ids = _windows(llama.config.vocab_size, 1)
    with torch.no_grad():
        assert torch.equal(sq.load(tmp_path / "q").model(ids).logits, result.model(ids).logits)


def test_distill_keeps_the_start_when_nothing_helps(llama) -> None:  # noqa: ANN001
    """With the quantized model as its own teacher the start is optimal (held-out KL 0): any step can only tie or
    lose, so the starting scales are kept bit for bit."""
    result = sq.quantize(llama, Recipe(weight=QuantSpec("int8", "per_channel")), show_progress=False)
    teacher = copy.deepcopy(result.model)
    scales = {n: m.weight_scale.clone() for n, m in result.model.named_modules() if isinstance(m, QLinear)}
    rep = sq.distill(result, teacher, _windows(llama.config.vocab_size), steps=4, lr=0.5, eval_every=1,
                     show_progress=False)  # fmt: skip
    assert rep.best_step == 0 and rep.steps == 4 and rep.kl_before < 1e-6
    assert all(torch.equal(m.weight_scale, scales[n]) for n, m in result.model.named_modules() if n in scales)


def test_distill_bad_input(llama) -> None:  # noqa: ANN001
    teacher = copy.deepcopy(llama)
    with pytest.raises(SlimquantError, match="QuantizationResult"):
        sq.distill(llama, teacher, _windows(llama.config.vocab_size))
    w8a8 = sq.quantize(copy.deepcopy(llama), Recipe(weight=QuantSpec("int8", "per_channel"),
                                                    input=QuantSpec("int8", "per_token", dynamic=True)),
                       show_progress=False)  # fmt: skip
    with pytest.raises(SlimquantError, match="no weight-only integer quantized layer"):
        sq.distill(w8a8, teacher, _windows(llama.config.vocab_size))
    fp8 = sq.quantize(copy.deepcopy(llama), Recipe(weight=QuantSpec("fp8_e4m3", "per_channel")), show_progress=False)
    with pytest.raises(NotSupportedYet, match="fp8"):
        sq.distill(fp8, teacher, _windows(llama.config.vocab_size))
    r = sq.quantize(copy.deepcopy(llama), Recipe(weight=QuantSpec("int4", "per_group", 32)), show_progress=False)
    with pytest.raises(SlimquantError, match="give more items"):
        sq.distill(r, teacher, _windows(llama.config.vocab_size, n=2))


def test_distill_stops_on_a_non_finite_loss_keeping_the_best(llama) -> None:  # noqa: ANN001
    teacher = copy.deepcopy(llama)

    class Poisoned(torch.nn.Module):  # the teacher's logits turn NaN on the training items
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.calls = teacher, 0

        def forward(self, input_ids: torch.Tensor):  # noqa: ANN201
            self.calls += 1
            out = self.inner(input_ids=input_ids).logits
            return out if self.calls <= 2 else out * float("nan")  # the 2 held-out targets come first

    result = sq.quantize(llama, Recipe(weight=QuantSpec("int4", "per_group", 32)), show_progress=False)
    scales = {n: m.weight_scale.clone() for n, m in result.model.named_modules() if isinstance(m, QLinear)}
    rep = sq.distill(result, Poisoned(), _windows(llama.config.vocab_size), steps=5, show_progress=False)
    assert rep.stopped == "non-finite loss at step 1" and rep.best_step == 0 and rep.steps == 0
    assert all(torch.equal(m.weight_scale, scales[n]) for n, m in result.model.named_modules() if n in scales)
