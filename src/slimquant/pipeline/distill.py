"""End-to-end distillation of a quantized model's scales (issue 15, item 3): after post-training quantization,
train every weight-only layer's scales against the float model's outputs (KL per token), with the integer
weights frozen (EfficientQAT's end-to-end stage, Chen et al. 2024: train the quantization parameters, not the
weights).

Each :class:`QLinear` with an integer weight gets a learned per-scale factor ``exp(delta)`` (``delta`` starts at
0, so training starts exactly at the post-training model); the layer computes ``(q - zero_point) * scale *
exp(delta)`` with ``q`` and ``zero_point`` fixed, so the result is again a plain quantized layer: its new scales
are written back and every export format that held it still holds it. Memory stays bounded: the only trained
tensors are the scales, and Hugging Face models run with gradient checkpointing (each block's activations are
recomputed in the backward pass instead of kept).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimquant.errors import NotSupportedYet, SlimquantError
from slimquant.kernels.weight_only import unpacked
from slimquant.nn.modules import QLinear
from slimquant.pipeline.calibrate import forward_item, model_inputs
from slimquant.surgery.select import set_module
from slimquant.types.qtype import qtype as lookup_qtype
from slimquant.types.result import QuantizationResult
from slimquant.types.spec import Granularity

log = logging.getLogger(__name__)


@dataclass
class DistillReport:
    """What :func:`distill` did: ``kl_before`` / ``kl_after`` (mean KL per token from the teacher on the held-out
    calibration items, nats), the step whose scales were kept (``best_step``, 0: the starting scales), how many
    steps ran, the seconds, the layers tuned, and ``stopped`` (why it ended early, or None)."""

    kl_before: float
    kl_after: float
    best_step: int
    steps: int
    seconds: float
    layers: int
    stopped: str | None = None
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out KL)


class _ScaleTuned(nn.Module):
    """A weight-only :class:`QLinear` whose scales are multiplied by ``exp(delta)`` (``delta`` learned)."""

    def __init__(self, layer: QLinear) -> None:
        super().__init__()
        object.__setattr__(self, "layer", layer)  # unregistered: swapped back after training
        self.register_buffer("q", unpacked(layer.weight, layer.spec, layer.weight_cols).detach())
        self.delta = nn.Parameter(torch.zeros_like(layer.weight_scale, dtype=torch.float32))

    def scale(self) -> torch.Tensor:
        return self.layer.weight_scale.float() * torch.exp(self.delta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, spec = self.layer, self.layer.spec
        n, k = self.q.shape
        s = self.scale()
        zp = layer.weight_zero_point
        if spec.granularity is Granularity.PER_TENSOR:
            w = self.q.float() if zp is None else self.q.float() - zp.reshape(())
            w = w * s.reshape(())
        else:
            g = s.shape[1]
            w = self.q.float().reshape(n, g, k // g)
            if zp is not None:
                w = w - zp.unsqueeze(-1)
            w = (w * s.unsqueeze(-1)).reshape(n, k)
        return F.linear(x, w.to(x.dtype), layer.bias)


def _logits(out: Any) -> torch.Tensor:
    t = getattr(out, "logits", out)
    if not isinstance(t, torch.Tensor):
        raise SlimquantError(f"distill compares the models' outputs; got {type(out).__name__} (expected a tensor or "
                             "an output with .logits)")  # fmt: skip
    return t


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) per position over the last dim."""
    t = F.log_softmax(teacher.float(), -1)
    s = F.log_softmax(student.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


def distill(result: QuantizationResult, teacher: nn.Module, calib_data: Any, steps: int = 100, lr: float = 1e-3,
            holdout: int = 2, eval_every: int = 10, show_progress: bool = True) -> DistillReport:  # fmt: skip
    """Tune the scales of ``result``'s weight-only integer layers (in place) so its outputs match ``teacher``'s
    (the float model) on ``calib_data``; keeps the scales of the step with the lowest held-out KL.

    ``calib_data``: items :func:`slimquant.pipeline.calibrate.run_batches` takes (e.g. a ``[N, L]`` tensor of
    token windows); the last ``holdout`` items are held out to choose the step and measure the KL (they are never
    trained on). Adam with ``lr`` on ``delta`` (the log of each scale's factor), one item per step, cycling,
    cosine decay to 0 over ``steps``. A non-finite loss stops the run, keeping the best scales so far."""
    from tqdm.auto import tqdm

    if not isinstance(result, QuantizationResult):
        raise SlimquantError(f"distill takes the QuantizationResult of slimquant.quantize, got {type(result).__name__}")
    if not isinstance(steps, int) or steps < 1 or not lr > 0 or not isinstance(holdout, int) or holdout < 1:
        raise SlimquantError(f"distill: steps and holdout must be positive integers and lr positive (got steps={steps}, "
                             f"lr={lr}, holdout={holdout})")  # fmt: skip
    model = result.model
    layers = {n: m for n, m in model.named_modules() if type(m) is QLinear}
    for name, m in layers.items():
        qt = lookup_qtype(m.spec.qtype)
        if qt.is_float or m.spec.gguf is not None:
            raise NotSupportedYet(f"distill: layer {name} is {m.spec.describe()}: tuning its scales would leave "
                                  f"{'the fp8 format' if qt.is_float else 'the GGUF block grid'}; integer "
                                  "weight-only layers are supported")  # fmt: skip
    if not layers:
        raise SlimquantError("distill: the model has no weight-only integer quantized layer (QLinear) to tune")
    items = model_inputs(calib_data)
    if len(items) <= holdout:
        raise SlimquantError(f"distill: {len(items)} calibration item(s) for holdout={holdout}; give more items")
    train_items, held = items[:-holdout], items[-holdout:]
    device = next(iter(layers.values())).weight_scale.device
    grads = [(p, p.requires_grad) for p in model.parameters()]  # restored afterwards
    for p, _ in grads:
        p.requires_grad_(False)
    wrapped = {n: _ScaleTuned(m).to(device) for n, m in layers.items()}
    for n, w in wrapped.items():
        set_module(model, n, w)
    params = [w.delta for w in wrapped.values()]
    for p in params:
        p.requires_grad_(True)
    was_training, teacher_training = model.training, teacher.training
    checkpointing = bool(getattr(model, "supports_gradient_checkpointing", False)) and hasattr(model, "gradient_checkpointing_enable")
    t0 = time.perf_counter()
    try:
        teacher.eval()
        with torch.no_grad():
            targets = [_logits(forward_item(teacher, it)) for it in held]
        model.eval()

        def held_out_kl() -> float:
            with torch.no_grad():
                vals = [float(_kl(t, _logits(forward_item(model, it)))) for t, it in zip(targets, held)]
            return sum(vals) / len(vals)

        kl0 = held_out_kl()
        best = (kl0, 0, [p.detach().clone() for p in params])
        history = [(0, kl0)]
        if checkpointing:  # transformers 5 renamed it; the old name warns
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        stopped, ran = None, 0
        for step in tqdm(range(1, steps + 1), desc="distill", disable=not show_progress, unit="step"):
            item = train_items[(step - 1) % len(train_items)]
            with torch.no_grad():
                target = _logits(forward_item(teacher, item))
            model.train(checkpointing)  # HF checkpointing runs in training mode only (no dropout in these models)
            loss = _kl(target, _logits(forward_item(model, item)))
            if not math.isfinite(float(loss.detach())):
                stopped = f"non-finite loss at step {step}"
                log.warning("distill: %s; keeping the scales of step %d", stopped, best[1])
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            ran = step
            if step % eval_every == 0 or step == steps:
                model.eval()
                kl = held_out_kl()
                history.append((step, kl))
                if kl < best[0]:
                    best = (kl, step, [p.detach().clone() for p in params])
    finally:
        if checkpointing:
            off = getattr(model, "activation_checkpointing_disable", None) or getattr(model, "gradient_checkpointing_disable", None)
            if off is not None:
                off()
        for n, w in wrapped.items():
            set_module(model, n, w.layer)
        for p, g in grads:
            p.requires_grad_(g)
        model.train(was_training)
        teacher.train(teacher_training)
    with torch.no_grad():
        for w, delta in zip(wrapped.values(), best[2]):
            w.layer.weight_scale.copy_((w.layer.weight_scale.float() * torch.exp(delta)).to(w.layer.weight_scale.dtype))
    seconds = time.perf_counter() - t0
    log.info("distill: held-out KL %.5f -> %.5f (best step %d of %d, %d layers, %.0f s)", kl0, best[0], best[1], ran,
             len(wrapped), seconds)  # fmt: skip
    return DistillReport(kl0, best[0], best[1], ran, seconds, len(wrapped), stopped, history)
