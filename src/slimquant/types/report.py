"""What a conversion did, as typed rows: one :class:`LayerRow` per quantized layer, one :class:`StepRow` per group
a model or block step transformed (smoothing, AWQ), the layers kept float and why.

The rows are data (JSON round trip: the report files beside a checkpoint, the work directory a block-by-block
run resumes from); :meth:`ConversionReport.table` renders them for people.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_LAYER_FIELDS = ("name", "kind", "spec", "algorithm", "sqnr_db", "samples", "output_error", "fallback")


@dataclass
class LayerRow:
    """One quantized layer.

    ``spec``: its weight spec as text (``QuantSpec.describe``); ``algorithm``: the weight step that produced it
    (``rtn`` when a calibrated step fell back, ``fallback`` then says why); ``sqnr_db``: weight SQNR of the
    quantized against the float weight. Layers solved block by block also have ``samples`` (calibration rows
    seen) and ``output_error`` (relative output error on them, ``tr(dW H dW^T) / tr(W H W^T)``; None without
    rows). ``details``: what the step or the module adds (GPTQ ``damp``, ``dead_columns``; W8A8 static
    ``input_rule`` / ``input_range``; ``hessian_shared_with``), JSON values.
    """

    name: str
    kind: str
    spec: str
    algorithm: str
    sqnr_db: float | None = None
    samples: int | None = None
    output_error: float | None = None
    fallback: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def block_solved(self) -> bool:
        """Whether the layer was solved block by block (it then has ``samples``)."""
        return self.samples is not None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "spec": self.spec}
        if self.block_solved:
            out["samples"] = self.samples
        out["algorithm"] = self.algorithm
        if self.fallback is not None:
            out["fallback"] = self.fallback
        out.update(self.details)
        out["sqnr_db"] = self.sqnr_db
        if self.block_solved:
            out["output_error"] = self.output_error
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerRow":
        """From :meth:`to_dict`'s output (or a flat row of the same keys)."""
        d = dict(d)
        known = {k: d.pop(k) for k in _LAYER_FIELDS if k in d}
        if "name" not in known or "algorithm" not in known:
            raise ValueError(f"a layer report row needs 'name' and 'algorithm', got {sorted(known)}")
        known.setdefault("kind", "")
        known.setdefault("spec", "")
        return cls(**known, details=d)


@dataclass
class StepRow:
    """One group a model or block step transformed: ``step`` (its type, e.g. ``smoothquant``, ``awq``), ``prev``
    (the producer the scales were folded into, when there is one), ``linears`` (the layers it feeds) and
    ``values`` (what the step chose or measured: ``alpha``, AWQ's ``ratio`` and errors, ...; JSON values)."""

    step: str
    prev: str | None = None
    linears: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step}
        if self.prev is not None:
            out["prev"] = self.prev
        out["linears"] = list(self.linears)
        out.update(self.values)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], step: str | None = None) -> "StepRow":
        """From :meth:`to_dict`'s output, or from a step implementation's plain row (``step`` then names it; a
        ``method`` key, as rows of earlier versions carried, is read as the step)."""
        d = dict(d)
        name = d.pop("step", None) or d.pop("method", None) or step
        if not isinstance(name, str) or not name:
            raise ValueError(f"a step report row needs the step's name, got keys {sorted(d)}")
        d.pop("method", None)
        linears = d.pop("linears", [])
        return cls(name, d.pop("prev", None), list(linears) if isinstance(linears, (list, tuple)) else [linears], d)


@dataclass
class ConversionReport:
    """What a conversion did: per-layer rows, the step rows, skipped layers with reasons, patterns that matched
    nothing, tied outputs (output layer -> the embedding it shares), and the attention / KV-cache calibration
    summaries (per module: the scales' ranges, the measured error)."""

    layers: list[LayerRow] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    unmatched_patterns: tuple[str, ...] = ()
    tied: dict[str, str] = field(default_factory=dict)
    steps: list[StepRow] = field(default_factory=list)
    attention: dict = field(default_factory=dict)
    kv_cache: dict = field(default_factory=dict)

    def layer(self, name: str) -> LayerRow:
        """The row of layer ``name``; KeyError naming the layers there are when it was not quantized."""
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(f"layer {name} is not in the report (quantized: {', '.join(r.name for r in self.layers)})")

    def steps_of(self, step: str) -> list[StepRow]:
        """The rows of the step type ``step`` (e.g. ``"awq"``)."""
        return [r for r in self.steps if r.step == step]

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [r.to_dict() for r in self.layers], "skipped": self.skipped,
                "unmatched_patterns": list(self.unmatched_patterns), "tied": self.tied,
                "steps": [r.to_dict() for r in self.steps], "attention": self.attention,
                "kv_cache": self.kv_cache}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConversionReport":
        """From :meth:`to_dict`'s output (``quantize_report.json``; the step rows of earlier versions were under
        ``smoothing``)."""
        return cls([LayerRow.from_dict(r) for r in d.get("layers", [])], dict(d.get("skipped", {})),
                   tuple(d.get("unmatched_patterns", ())), dict(d.get("tied", {})),
                   [StepRow.from_dict(r, "smoothing") for r in d.get("steps", d.get("smoothing", []))],
                   dict(d.get("attention", {})), dict(d.get("kv_cache", {})))  # fmt: skip

    def table(self) -> str:
        """The per-layer rows as a Markdown table (algorithm, spec, weight SQNR, calibration output error)."""
        lines = ["| layer | kind | spec | algorithm | SQNR dB | rel. output error | calib rows |",
                 "|---|---|---|---|---|---|---|"]
        for r in self.layers:
            err = r.output_error
            algo = r.algorithm + (" (fallback: " + r.fallback + ")" if r.fallback else "")
            sqnr = "" if r.sqnr_db is None else r.sqnr_db
            rows = "-" if r.samples is None else r.samples
            lines.append(f"| {r.name} | {r.kind} | {r.spec} | {algo} | {sqnr} | "
                         f"{'-' if err is None else f'{err:.3e}'} | {rows} |")  # fmt: skip
        for name, why in sorted(self.skipped.items()):
            lines.append(f"| {name} | | float | kept float: {why} | | | |")
        return "\n".join(lines)
